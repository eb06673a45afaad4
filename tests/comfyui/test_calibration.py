"""Calibration inside ComfyUI (issue 9): keyed by the weights the sampler runs, made by the Calibrate node,
found by the Monitor's 'auto', never applied to another model; the live payload; the defects."""
import json
import math

import pytest
import torch

from memoguard.calibration import CALIBRATION_SEEDS, Calibration, CalibrationStore
from memoguard.standalone.diffusers_model import BUNDLED_MODEL
from nodes.calibration_choice import lookup, model_key
from nodes.calibration_run import calibrate_loaded, prompt_list
from nodes.latents import sampler_latent
from nodes.mitigation_hook import MitigationSession, MitigationSettings, attach_mitigation
from nodes.monitor_hook import CFG1_MESSAGE, MonitorSession, MonitorSettings, attach_monitor
from nodes.tiny_loader import tiny_latent_format
from . import harness

BUNDLED_KEY = "unet-681368e6af6f82b5"
STEP_FIELDS = {"node", "run", "step", "total", "score", "sigma", "band", "window", "threshold", "label"}
VERDICT_FIELDS = {"node", "run", "flagged", "summary", "verdicts", "notes"}
PROMPTS = [f"a {c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("circle", "square", "cross")]


@pytest.fixture(scope="module")
def bundled():
    """The bundled model's trained weights (diffusers layout) as a harness BaseModel, and its CLIP."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel
    unet = UNet2DConditionModel.from_pretrained(BUNDLED_MODEL / "unet").eval()
    text = CLIPTextModel.from_pretrained(BUNDLED_MODEL / "text_encoder").eval()
    return harness.ModelPatcher(harness.BaseModel(unet)), harness.CLIP(text)


@pytest.fixture(scope="module")
def random_copy():
    unet, text = harness.tiny_unet(seed=5)
    return harness.ModelPatcher(harness.BaseModel(unet)), harness.CLIP(text)


def monitor(patcher, clip, text="a red circle", batch=1, cfg=3.0, steps=20, scheduler=None, sigmas=None, seed=0,
            negative="", **settings):
    """A monitored and a plain run; negative None: a guider without a negative (BasicGuider)."""
    events = []
    session = MonitorSession(MonitorSettings(**settings), node_id="2", emit=lambda e, d: events.append((e, d)),
                             show=lambda t, n: events.append(("text", t)))
    noise = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    pos = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    neg = None if negative is None else clip.encode_from_tokens_scheduled(clip.tokenize(negative))
    out = harness.sample(attach_monitor(patcher, session), noise, pos, neg, cfg=cfg, steps=steps, sigmas=sigmas)
    plain = harness.sample(patcher, noise, pos, neg, cfg=cfg, steps=steps, sigmas=sigmas)
    return session, events, out, plain


def of(events, kind):
    return [d for e, d in events if e == kind]


def test_auto_finds_the_bundled_preset_for_the_bundled_weights_only(bundled, random_copy, tmp_path):
    assert model_key(bundled[0].model) == BUNDLED_KEY
    session, events, out, plain = monitor(*bundled, "a purple ring, lighthouse poster", steps=6,
                                          calibration=lookup("auto", folders=[tmp_path]))
    assert torch.equal(out, plain)
    (verdict,) = session.final_verdicts()
    preset = CalibrationStore(tmp_path).find(BUNDLED_KEY)
    assert verdict.label in ("ok", "flagged") and verdict.threshold == pytest.approx(
        preset.at_noise_level(float(harness.schedule(bundled[0].model, 6)[0])).threshold(0.01))
    assert "bundled with MemoGuard" in session.ctx.source
    assert not verdict.manual and "set by hand" not in verdict.summary()  # the calibration's threshold

    session, events, out, plain = monitor(*random_copy, steps=6, calibration=lookup("auto", folders=[tmp_path]))
    assert torch.equal(out, plain)
    (verdict,) = session.final_verdicts()
    assert verdict.label == "uncalibrated" and "ok" not in verdict.summary().split(":")[0]
    assert "no calibration for this model" in verdict.summary() and "MemoGuard Calibrate" in verdict.summary()
    assert all(d["label"] == "uncalibrated" and d["threshold"] is None and d["band"] is None
               for d in of(events, "step"))


def test_the_monitor_scores_as_its_calibration_does(random_copy, tmp_path):
    """A calibration made before detectors were recorded holds magnitude scores: the Monitor then scores the
    magnitude and judges by it (no recalibration needed); one of a score no sampler step gives is refused, said."""
    patcher, clip = random_copy
    key = model_key(patcher.model)
    session = monitor(patcher, clip, steps=4, calibration=lookup("none"))[0]
    detail = session.trace.score()[0].item()
    assert session.trace.detector == "detail_magnitude"
    for detector, judged in (("magnitude", True), ("anisotropy", False)):
        folder = tmp_path / detector
        CalibrationStore(folder).save(Calibration(key, [0.001 * k for k in range(1, 41)],
                                                  conditions={"detector": detector}))
        session, _, out, plain = monitor(patcher, clip, steps=4, calibration=lookup("auto", folders=[folder]))
        assert torch.equal(out, plain)
        (verdict,) = session.final_verdicts()
        if judged:
            assert session.trace.detector == verdict.detector == "magnitude" and verdict.label in ("ok", "flagged")
            assert verdict.score > detail  # the magnitude of the same difference, its low frequencies included
        else:
            assert verdict.label == "uncalibrated" and "only a first-step scan gives" in session.ctx.source


def test_calibrate_node_saves_what_the_monitor_then_uses(random_copy, tmp_path):
    patcher, clip = random_copy
    sigmas = harness.schedule(patcher.model, 4)
    stages = []
    result = calibrate_loaded(patcher, clip, (3, 16, 16), sigmas, PROMPTS, tmp_path, cfg=3.0, band_prompts=3, seed=0,
                              batch_size=4, scheduler="normal", progress=lambda *a: stages.append(a))
    key = model_key(patcher.model)
    assert result.path == tmp_path / f"{key}.json" and result.path.is_file()
    assert key in result.summary and str(result.path) in result.summary and "threshold at 1% FPR" in result.summary
    assert {s for s, _, _ in stages} == {"first step", "band"}
    cal = Calibration.load(result.path, key)
    assert cal.conditions["host"] == "comfyui" and cal.conditions["prediction"] == "eps"
    assert cal.conditions["noise_level"] == pytest.approx(float(sigmas[0])) and cal.conditions["latent"] == [3, 16, 16]
    assert len(cal.scores) == len(PROMPTS) * CALIBRATION_SEEDS and cal.band is not None and len(cal.band.noise_levels) == 4

    session, events, out, plain = monitor(patcher, clip, PROMPTS[0], steps=4,
                                          calibration=lookup("auto", folders=[tmp_path]))
    assert torch.equal(out, plain)
    (verdict,) = session.final_verdicts()
    assert verdict.label in ("ok", "flagged") and verdict.threshold == pytest.approx(cal.threshold(0.01))
    assert verdict.notes == []
    # the calibration measured exactly what the Monitor measures (same sigma, x_T scaling and encoding), at the
    # node's seed and the next 3, each generation a benign sample
    assert cal.meta["seeds"] == CALIBRATION_SEEDS == 4
    at_seeds = [verdict.score] + [monitor(patcher, clip, PROMPTS[0], steps=4, seed=s)[0].final_verdicts()[0].score
                                  for s in range(1, CALIBRATION_SEEDS)]
    for score in at_seeds:  # the scores are kept sorted
        assert min(abs(s - score) for s in cal.scores) < 1e-5 * max(1.0, score)
    steps = of(events, "step")
    assert all(set(d) == STEP_FIELDS for d in steps)
    assert all(d["band"] is not None and d["band"][0] <= d["band"][1] for d in steps[:-1])
    assert steps[0]["band"] == pytest.approx([cal.band.median[0], cal.band.high[0]])
    assert steps[0]["threshold"] == pytest.approx(cal.threshold(0.01)) and steps[0]["window"] == 1
    assert steps[0]["sigma"] == pytest.approx(float(sigmas[0])) and steps[0]["label"] == verdict.label
    (final,) = of(events, "verdict")
    assert set(final) == VERDICT_FIELDS and final["verdicts"][0]["label"] == verdict.label

    # another cfg: the band does not apply, the chart is told so
    session, events, _, _ = monitor(patcher, clip, PROMPTS[0], steps=4, cfg=7.5,
                                    calibration=lookup("auto", folders=[tmp_path]))
    assert all(d["band"] is None for d in of(events, "step"))
    assert any("band not drawn" in n for n in session.final_verdicts()[0].notes)


def test_file_of_another_model_is_refused(bundled, random_copy, tmp_path):
    with torch.no_grad():
        other = Calibration(model_key(bundled[0].model), [0.01 * i for i in range(1, 50)])
    other.save(tmp_path / "other.json")
    session, events, out, plain = monitor(*random_copy, steps=4,
                                          calibration=lookup("file", "other.json", folders=[tmp_path]))
    assert torch.equal(out, plain)
    (verdict,) = session.final_verdicts()
    assert verdict.label == "uncalibrated" and "another model" in verdict.summary()
    assert "never applied to another" in verdict.summary()


def test_corrupt_calibration_is_a_message_not_a_crash_nor_a_fallback(bundled, tmp_path):
    (tmp_path / f"{BUNDLED_KEY}.json").write_text('{"format": 2, "models": {"unet-681368e6af6f82b5": {"scores": ')
    session, events, out, plain = monitor(*bundled, steps=4, calibration=lookup("auto", folders=[tmp_path]))
    assert torch.equal(out, plain)
    (verdict,) = session.final_verdicts()
    assert verdict.label == "uncalibrated"  # not the bundled preset behind it
    assert "unusable" in verdict.summary() and "unreadable" in verdict.summary()
    assert session.error is None


def test_hostile_calibration_files_are_a_message_on_the_node(bundled, tmp_path, hostile_calibration_files):
    for label, content, words in hostile_calibration_files(BUNDLED_KEY):
        (tmp_path / f"{BUNDLED_KEY}.json").write_bytes(content)
        session, events, out, plain = monitor(*bundled, steps=2,
                                              calibration=lookup("auto", folders=[tmp_path]))
        assert torch.equal(out, plain), label
        (verdict,) = session.final_verdicts()
        assert verdict.label == "uncalibrated" and words in verdict.summary(), (label, verdict.summary())
        assert session.error is None


def test_runs_that_differ_from_the_calibration_get_notes(random_copy, tmp_path):
    patcher, clip = random_copy
    key = model_key(patcher.model)
    Calibration(key, [0.01 * i for i in range(1, 50)], conditions={"prediction": "v", "noise_level": 3.0,
                                                                    "latent": [3, 32, 32]}).save(tmp_path / f"{key}.json")
    session, _, _, _ = monitor(patcher, clip, steps=4, calibration=lookup("auto", folders=[tmp_path]))
    (verdict,) = session.final_verdicts()
    text = " ".join(verdict.notes)
    assert "v-prediction" in text and "noise level" in text and "32x32" in text
    assert verdict.label in ("ok", "flagged") and "note:" in verdict.summary()


def test_one_verdict_per_image(bundled, tmp_path):
    session, events, out, plain = monitor(*bundled, batch=3, steps=4,
                                          calibration=lookup("auto", folders=[tmp_path]))
    assert torch.equal(out, plain)
    assert len(session.final_verdicts()) == 3 and len(of(events, "verdict")[0]["verdicts"]) == 3
    assert all(len(d["score"]) == 3 for d in of(events, "step"))
    data = session.to_dict()
    assert len(data["verdicts"]) == 3 and len(data["trace"]["rms"]) == 3
    assert len(data["band"]) == len(data["sigma"]) == 4 and data["window"] == 1


def test_cfg1_unavailable_says_it_once_per_image(bundled, tmp_path):
    session, events, out, plain = monitor(*bundled, batch=2, cfg=1.0, steps=4, negative=None,
                                          calibration=lookup("auto", folders=[tmp_path]))
    verdicts = session.final_verdicts()
    assert [v.label for v in verdicts] == ["unavailable", "unavailable"]
    summary = verdicts[0].summary()
    assert summary.count("score unavailable") == 1 and "cfg 1" in summary
    (event,) = of(events, "verdict")
    assert event["summary"].count("score unavailable") == 1 and len(event["verdicts"]) == 2
    assert CFG1_MESSAGE in summary


def test_score_node_never_stops_the_workflow_when_the_score_is_unavailable(bundled, tmp_path):
    import importlib
    patcher, clip = bundled
    session = MonitorSession(MonitorSettings(calibration=lookup("auto", folders=[tmp_path])),
                             emit=lambda e, d: None, show=lambda t, n: None)
    watched = attach_monitor(patcher, session)
    noise = torch.randn(1, 3, 16, 16)
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    with harness.comfy_api_stand_in():
        nodes_monitor = importlib.import_module("nodes.nodes_monitor")
        for cfg in (1.0, 3.0):
            samples = {"samples": harness.sample(watched, noise, pos, neg, cfg=cfg, steps=3)}
            out = nodes_monitor.MemorizationScore.execute(watched, samples)
            score, flagged, summary, plot = out.args
            assert plot.shape[0] == 1 and plot.shape[-1] == 3
            trace = json.loads(out.ui["memoguard_trace"][0])
            assert {"trace", "sigma", "band", "threshold", "window", "verdicts", "notes", "label"} <= set(trace)
            if cfg == 1.0:
                assert math.isnan(score) and not flagged and summary.count("score unavailable") == 1
                assert trace["label"] == "unavailable"
            else:
                assert math.isfinite(score) and trace["label"] in ("ok", "flagged") and len(trace["sigma"]) == 3


def test_token_contributions_empty_text_is_one_message():
    import importlib
    with harness.comfy_api_stand_in():
        tokens = importlib.import_module("nodes.nodes_tokens")
        node = tokens.TokenContributionsNode
        assert "validate_inputs" not in vars(node)  # ComfyUI repeats a validation error once per input
        assert tokens.input_problem("  ", 20, 1) == "the text is empty: give the prompt to explain"
        node.hidden = type("Hidden", (), {"unique_id": "10"})
        out = node.execute(None, None, " ", None, 0, 20, 1, 3.0, "normal", 1)
        chart, data = out.args
        assert json.loads(data) == {"error": "the text is empty: give the prompt to explain"}
        assert out.ui["text"] == ["the text is empty: give the prompt to explain"] and chart.shape[-1] == 3


class _Patcher:
    def __init__(self, latent_format):
        self.latent_format = latent_format

    def get_model_object(self, name):
        return getattr(self, name)


@pytest.mark.parametrize("version", ["v0.3.64", "0.33.0"])
def test_tiny_model_samples_an_empty_latent_of_128_at_16x16_on_both_versions(version):
    fix = harness.fix_empty_latent_channels_033 if version == "0.33.0" else harness.fix_empty_latent_channels_v0364
    latent = harness.empty_latent_image(128, 128, version=version)
    tiny = _Patcher(tiny_latent_format(harness.ChromaRadiance))
    assert tuple(sampler_latent(tiny, latent, fix).shape) == (1, 3, 16, 16)
    # and for a model whose format would resize it, explain/calibrate at the size KSampler samples at
    pixel_model = _Patcher(harness.ChromaRadiance())
    expected = (1, 3, 128, 128) if version == "0.33.0" else (1, 3, 16, 16)
    assert tuple(sampler_latent(pixel_model, latent, fix).shape) == expected


def test_mitigation_auto_takes_the_threshold_of_the_weights_it_runs(bundled, random_copy, tmp_path):
    for (patcher, clip), calibrated in ((bundled, True), (random_copy, False)):
        texts = []
        settings = MitigationSettings(mitigation="auto", strategy="minimize", calibration=lookup("auto", folders=[tmp_path]))
        session = MitigationSession(settings, emit=lambda e, d: None, show=lambda t, n: texts.append(t))
        noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("a purple ring, lighthouse poster"))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        out = harness.sample(attach_mitigation(patcher, session), noise, pos, neg, cfg=3.0, steps=3)
        if calibrated:
            assert session.record is not None and session.record.before
        else:
            assert session.record is None and "no calibration for this model" in texts[-1]
            assert torch.equal(out, harness.sample(patcher, noise, pos, neg, cfg=3.0, steps=3))


def test_prompt_list_defaults_to_the_shipped_benign_prompts():
    assert len(prompt_list("")) >= 100
    assert prompt_list("a cat\n\n# comment\n a dog ") == ["a cat", "a dog"]


def test_calibrate_node_has_a_tooltip_on_every_input():
    definition = harness.node_definitions()["MemoGuardCalibrate"]
    for name, spec in definition["input"]["required"].items():
        assert spec[1].get("tooltip"), name
    assert list(definition["input"]["required"]) == ["model", "clip", "latent", "steps", "scheduler", "cfg", "prompts",
                                                      "band_prompts", "seed", "batch_size"]


def test_calibrate_takes_prompts_over_one_chunk_and_scores_each_as_alone(random_copy, tmp_path):
    """A benign prompt longer than 75 tokens among short ones: ComfyUI encodes it in two chunks; the batch is
    scored in groups of one length, so every score equals the prompt's score in a batch of its own."""
    patcher, clip = random_copy
    sigmas = harness.schedule(patcher.model, 4)
    prompts = list(PROMPTS[:9]) + [", ".join(["a small red circle at the top of the picture"] * 9)]
    assert len(clip.tokenize(prompts[-1])["l"]) == 2
    run = lambda batch, folder: calibrate_loaded(patcher, clip, (3, 16, 16), sigmas, prompts, folder, cfg=3.0,
                                                 band_prompts=0, seed=0, batch_size=batch, scheduler="normal")
    together, alone = run(4, tmp_path / "a").calibration, run(1, tmp_path / "b").calibration
    assert len(together.scores) == len(prompts) * CALIBRATION_SEEDS
    assert sorted(together.scores) == pytest.approx(sorted(alone.scores), rel=1e-5)
