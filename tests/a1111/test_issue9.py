"""Issue 9 on the stand-in WebUI / Forge: calibration where the model is, verdicts by model key, per-image infotexts,
validated script_args, AND-prompt mitigation record, progress text, per-run panels, the panel's plot."""
import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from memoguard import step_score
from memoguard.calibration import CALIBRATION_SEEDS, Calibration
from memoguard.identity import weights_fingerprint
from memoguard_a1111 import calibrate as calibration_glue
from memoguard_a1111.script import MemoGuardScript, panel_for
from modules import processing, shared
from modules.sd_samplers_kdiffusion import CompVisDenoiser
from test_script import core_first_step, infotext_fields, make_p, run

SMALL = dict(prompts=10, band_prompts=2, steps=3, width=128, height=128)  # the tiny model's 16x16 latent


def calibrate_small(**overrides):
    return calibration_glue.calibrate_current({**SMALL, **overrides})


def scores_of(processed):
    return [float(infotext_fields(t)["MemoGuard score"]) for t in processed.infotexts]


# -- calibration inside the WebUI ---------------------------------------------------------------
@pytest.mark.parametrize("host", ["webui", "forge"])
def test_calibration_runs_through_the_webui_model_and_is_saved_by_key(host, tiny_model, models_folder, request):
    webui = request.getfixturevalue(host)
    answer = calibrate_small()
    key = weights_fingerprint(tiny_model.unet)  # the same weights on both hosts: one key
    assert answer["model_key"] == key
    path = models_folder / "memoguard" / f"{key}.json"
    assert answer["saved_to"] == str(path) and path.is_file()
    calibration = Calibration.load(path)
    assert calibration.conditions["host"] == ("forge" if host == "forge" else "a1111")
    assert calibration.conditions["prediction"] == "eps" and calibration.conditions["latent"] == [3, 16, 16]
    assert calibration.band is not None and len(calibration.band.noise_levels) == 3
    # the band's runs are the sampler the conditions name (it recorded "ddim" beside conditions saying Euler)
    assert calibration.band.settings["sampler"] == calibration.conditions["sampler"] == "Euler"
    assert answer["threshold"] == pytest.approx(calibration.threshold(0.01))
    # first-step scores: the core's score on the diffusers model at the WebUI's first sigma, at each of seeds 0-3
    assert calibration.meta["seeds"] == CALIBRATION_SEEDS == 4
    wrap = CompVisDenoiser(webui)
    sigma = wrap.get_sigmas(3)[0]
    prompts = calibration_glue.default_benign_prompts()[:10]
    at_seeds = []
    for seed in range(CALIBRATION_SEEDS):
        noise = torch.stack([torch.randn(webui.latent_shape, generator=torch.Generator().manual_seed(seed))] * 10)
        x_vp = noise * sigma / (sigma ** 2 + 1).sqrt()
        at_seeds.append(step_score(core_first_step(tiny_model, prompts, x_vp, wrap.sigma_to_t(sigma.reshape(1))[0])))
    want = torch.stack(at_seeds).reshape(-1)
    assert calibration.scores == pytest.approx(sorted(want.tolist()), rel=1e-3)
    assert calibration.conditions["noise_level"] == pytest.approx(float(sigma))
    assert shared.state.textinfo is None  # progress text cleared


def test_verdict_uses_the_calibration_of_this_checkpoint_only(webui, tiny_model):
    shared.sd_model = b = other_model(webui, tiny_model)  # (the bundled tiny model has a bundled calibration)
    _, uncalibrated = run(make_p(b))
    got = infotext_fields(uncalibrated.infotexts[0])
    assert got["MemoGuard verdict"] == "uncalibrated" and float(got["MemoGuard score"]) > 0  # never "ok"
    assert got["MemoGuard model"] == weights_fingerprint(b.unet)
    assert "Calibrate this checkpoint" in panel_for(uncalibrated.js())
    shared.sd_model = webui
    answer = calibrate_small()
    monitor, processed = run(make_p(webui))
    got = infotext_fields(processed.infotexts[0])
    assert got["MemoGuard verdict"] in ("ok", "flagged") and "MemoGuard percentile" in got
    v = monitor.verdict(0, 0)
    assert v.threshold == pytest.approx(answer["threshold"]) and v.flagged == (v.score >= answer["threshold"])
    assert "MemoGuard note" not in got and "MemoGuard error" not in got


@pytest.mark.parametrize("host", ["webui", "forge"])
def test_a_run_is_scored_as_its_calibration_is(host, request):
    """A calibration from before detectors were recorded (magnitude scores) still judges: the run scores the
    magnitude, looked up after the first model call (A1111 merges LoRAs there); the default is the detail."""
    webui = request.getfixturevalue(host)
    shared.sd_model = webui
    plain, _ = run(make_p(webui))
    assert plain.results[0].trace.detector == "detail_magnitude"
    key = plain.model_key
    Calibration(key, [0.01 * k for k in range(1, 41)], conditions={"detector": "magnitude"}).save(
        calibration_glue.store_folder() / f"{key}.json")
    monitor, processed = run(make_p(webui))
    v = monitor.verdict(0, 0)
    assert monitor.results[0].trace.detector == v.detector == "magnitude" and v.label in ("ok", "flagged")
    got = infotext_fields(processed.infotexts[0])
    assert v.score > plain.verdict(0, 0).score and got["MemoGuard verdict"] == v.label
    assert got["MemoGuard detector"] == "magnitude"
    # auto mitigation at step 0, before the first model call: it decides by the magnitude the calibration holds
    mitigated, _ = run(make_p(webui), mitigation="auto", strategy="mask_padding")
    record = mitigated.results[0].mitigation
    assert mitigated.results[0].trace.detector == "magnitude"
    assert record.before[0] == pytest.approx(v.score, rel=1e-4) and record.ran == (v.score >= v.threshold)


def other_model(webui_model, tiny_model):
    """A second checkpoint: the same architecture, other weights (as random-sd15-b)."""
    from webui_model import TinyLatentDiffusion
    other = copy.copy(tiny_model)
    other.unet = copy.deepcopy(tiny_model.unet)
    with torch.no_grad():
        for p in other.unet.parameters():
            p.mul_(-1)
    model = TinyLatentDiffusion(other)
    model.sd_checkpoint_info = SimpleNamespace(model_name="tiny-sd-b")
    return model


def test_second_checkpoint_is_uncalibrated_and_a_file_of_another_model_is_refused(webui, tiny_model):
    calibrate_small()
    own = Calibration.load(next((calibration_glue.store_folder()).glob("*.json")))
    shared.sd_model = b = other_model(webui, tiny_model)
    _, processed = run(make_p(b))
    got = infotext_fields(processed.infotexts[0])
    assert got["MemoGuard verdict"] == "uncalibrated" and got["MemoGuard model"] != own.model_key
    path = calibration_glue.store().path_for(own.model_key)
    assert calibration_glue.file_options() == ["(none)", path.name]
    _, processed = run(make_p(b), calibration_file=path.name)
    got = infotext_fields(processed.infotexts[0])
    assert got["MemoGuard verdict"] == "uncalibrated"
    assert "made for another model" in got["MemoGuard error"] and own.model_key in got["MemoGuard error"]


def test_a_calibration_file_outside_the_models_folder_is_never_read(webui, tiny_model, tmp_path):
    """The Calibration file is picked from models/memoguard; a path (API script_args, an old setting) is refused
    with the same words whether or not it exists, and a valid calibration elsewhere is not applied."""
    answer = calibrate_small()
    outside = tmp_path / "elsewhere.json"
    outside.write_bytes(Path(answer["saved_to"]).read_bytes())
    errors = set()
    for given in (str(outside), "/etc/passwd", "/etc/nonexistent.json", "../" + outside.name):
        _, processed = run(make_p(webui), calibration_file=given)
        got = infotext_fields(processed.infotexts[0])
        assert got["MemoGuard verdict"] == "uncalibrated" and "is not one of the calibrations in" in got["MemoGuard error"]
        errors.add(got["MemoGuard error"].replace(given, "X"))
    assert len(errors) == 1  # no existence oracle
    _, processed = run(make_p(webui), calibration_file=Path(answer["saved_to"]).name)
    assert infotext_fields(processed.infotexts[0])["MemoGuard verdict"] in ("ok", "flagged")


def test_hostile_calibration_files_are_a_message_in_the_infotext(webui, tiny_model, hostile_calibration_files):
    folder = calibration_glue.store_folder()
    folder.mkdir(parents=True)
    key = weights_fingerprint(tiny_model.unet)
    plain = processing.process_images(make_p(webui))
    for label, content, words in hostile_calibration_files(key):
        (folder / f"{key}.json").write_bytes(content)
        _, processed = run(make_p(webui))
        got = infotext_fields(processed.infotexts[0])
        assert got["MemoGuard verdict"] == "uncalibrated" and words in got["MemoGuard error"], (label, got)
        assert torch.equal(plain.images[0], processed.images[0])


def test_corrupt_calibration_file_is_a_clear_message_not_a_crash(webui, tiny_model):
    folder = calibration_glue.store_folder()
    folder.mkdir(parents=True)
    (folder / f"{weights_fingerprint(tiny_model.unet)}.json").write_text("{not json")
    plain = processing.process_images(make_p(webui))
    _, processed = run(make_p(webui))
    got = infotext_fields(processed.infotexts[0])
    assert got["MemoGuard verdict"] == "uncalibrated" and "unreadable" in got["MemoGuard error"]
    assert torch.equal(plain.images[0], processed.images[0])


def test_a_run_that_differs_from_the_calibration_says_so(webui):
    calibrate_small(width=64, height=64)  # an 8x8 latent; the stand-in samples 16x16
    monitor, processed = run(make_p(webui))
    got = infotext_fields(processed.infotexts[0])
    assert "calibrated at latent size 8x8, this run is 16x16" in got["MemoGuard note"]
    assert "latent size 8x8" in panel_for(processed.js())


def test_calibration_request_errors_are_clear(webui):
    for bad, word in ((dict(prompts=3), "prompts"), (dict(steps="x"), "steps"), (dict(width=100), "multiple of 8"),
                      (dict(colour=1), "unknown")):
        with pytest.raises(calibration_glue.CalibrationError, match=word):
            calibrate_small(**bad)


def test_lazily_merged_lora_weights_get_their_own_key(webui, tiny_model, monkeypatch):
    """A1111's Lora merges its weights in the first forward of a run: the key is taken after it."""
    calibrate_small()
    base_key = weights_fingerprint(tiny_model.unet)
    unet = webui.unet
    saved = [p.detach().clone() for p in unet.parameters()]

    def merge_once(module, args):
        with torch.no_grad():
            for p in module.parameters():
                p.neg_()
        handle.remove()

    handle = unet.register_forward_pre_hook(merge_once)
    monkeypatch.setitem(sys.modules, "networks", SimpleNamespace(loaded_networks=[
        SimpleNamespace(name="lora", te_multiplier=1.0, unet_multiplier=1.0, dyn_dim=None)]))
    try:
        _, processed = run(make_p(webui))
    finally:
        with torch.no_grad():
            for p, s in zip(unet.parameters(), saved):
                p.copy_(s)
    got = infotext_fields(processed.infotexts[0])
    assert got["MemoGuard model"] != base_key and got["MemoGuard verdict"] == "uncalibrated"


# -- per-image infotexts ----------------------------------------------------------------------
@pytest.mark.parametrize("host", ["webui", "forge"])
def test_each_image_infotext_is_its_own(host, request):
    """batch 2 x n_iter 2: every infotext carries its own image's score, verdict, mitigation (not image 1's)."""
    webui = request.getfixturevalue(host)
    p = make_p(webui, batch_size=2, n_iter=2)
    monitor, processed = run(p, mitigation="always", strategy="minimize", max_iters=1)
    scores = scores_of(processed)
    assert len(set(scores)) == 4
    for index, text in enumerate(processed.infotexts):
        iteration, position = divmod(index, 2)
        assert float(infotext_fields(text)["MemoGuard score"]) == pytest.approx(
            monitor.verdict(iteration, position).score, abs=1e-4)
        record = monitor.results[iteration].mitigation
        assert infotext_fields(text)["MemoGuard mitigation"].endswith(f"{record.after[position]:.4f}")
    # each equals what a single-image run of that seed gives
    for index in range(4):
        _, single = run(make_p(webui, seed=p.seed + index), mitigation="always", strategy="minimize", max_iters=1)
        assert scores_of(single)[0] == pytest.approx(scores[index], abs=2e-4)
    # a threshold between the scores: flagged images are recorded as flagged, the others as ok
    _, monitored = run(make_p(webui, batch_size=2, n_iter=2))
    plain_scores = scores_of(monitored)
    threshold = sum(sorted(plain_scores)[1:3]) / 2  # between the 2nd and 3rd (4-decimal values)
    _, judged = run(make_p(webui, batch_size=2, n_iter=2), threshold=threshold)
    for text, score in zip(judged.infotexts, plain_scores):
        assert infotext_fields(text)["MemoGuard verdict"] == ("flagged" if score >= threshold else "ok")
    assert processed.infotext(p, 3) == processed.infotexts[3]  # Processed.infotext(index) agrees too


# -- script_args validation -------------------------------------------------------------------
@pytest.mark.parametrize("args, word", [(["abc"], "window"), ([1, 0, "", 0.01, False, 1, "bogus"], "mitigation"),
                                        ([1, 0, "", 0.01, "maybe"], "explain"), ([1, -1], "threshold"),
                                        ([1, 0, "", 2.0], "fpr"), ([1, 0, 5], "calibration_file"),
                                        ([1, 0, "", 0.01, False, 1, "always", 0, 0.05, 10, "opposite_guidance", 0,
                                          "auto", 2.0], "early_scale")])
def test_invalid_script_args_are_reported_and_the_image_still_returned(webui, args, word, capsys):
    plain = processing.process_images(make_p(webui))
    processed = MemoGuardScript().run(make_p(webui), *args)
    got = infotext_fields(processed.infotexts[0])
    assert word in got["MemoGuard error"] and "did not run" in got["MemoGuard error"]
    assert torch.equal(plain.images[0], processed.images[0])
    assert "MemoGuard error" in capsys.readouterr().err


def test_boolean_strings_are_parsed(webui):
    off = MemoGuardScript().run(make_p(webui), 1, 0, "", 0.01, "false")
    on = MemoGuardScript().run(make_p(webui), 1, 0, "", 0.01, "true")
    assert "MemoGuard tokens" not in infotext_fields(off.infotexts[0])
    assert infotext_fields(on.infotexts[0])["MemoGuard tokens"]
    numeric = MemoGuardScript().run(make_p(webui), "2", "0", "", "0.05")
    assert "MemoGuard error" not in infotext_fields(numeric.infotexts[0])


# -- AND prompt mitigation record ------------------------------------------------------------
@pytest.mark.parametrize("host", ["webui", "forge"])
def test_and_prompt_mitigation_records_the_images_combined_score(host, request):
    webui = request.getfixturevalue(host)
    prompt = "a red house AND a blue boat"
    _, plain = run(make_p(webui, prompt=prompt))
    monitor, processed = run(make_p(webui, prompt=prompt), mitigation="always", strategy="minimize", max_iters=2, lr=0.1)
    mode, iterations, _, before, _, after = infotext_fields(processed.infotexts[0])["MemoGuard mitigation"].split()
    assert float(before) == pytest.approx(scores_of(plain)[0], abs=1e-4)  # the image's score, not sub-prompt 1's
    sampled = monitor.results[0].trace.per_step()[0, 0].item()
    assert float(after) == pytest.approx(sampled, abs=1e-4) and float(after) < float(before)


def test_auto_mitigation_decides_on_the_images_combined_score(webui):
    prompt = "a red house AND a blue boat"
    plain, _ = run(make_p(webui, prompt=prompt))
    combined = plain.results[0].trace.score()[0].item()  # not the infotext's 4 decimals
    monitor, processed = run(make_p(webui, prompt=prompt), threshold=combined * 0.999, mitigation="auto", strategy="minimize", max_iters=1)
    assert monitor.results[0].mitigation.ran
    monitor, _ = run(make_p(webui, prompt=prompt), threshold=combined * 1.001, mitigation="auto", strategy="minimize", max_iters=1)
    assert not monitor.results[0].mitigation.ran


def test_auto_mitigation_uses_the_stored_calibration(webui):
    answer = calibrate_small()
    monitor, processed = run(make_p(webui), mitigation="auto", strategy="minimize", max_iters=1)
    record = monitor.results[0].mitigation
    assert record.ran == (record.before[0] >= answer["threshold"])
    assert "no calibration" not in (record.reason or "")


# -- progress text, per-run panels, the plot -------------------------------------------------------
@pytest.mark.parametrize("host", ["webui", "forge"])
def test_progress_text_is_cleared_when_the_run_ends(host, request):
    webui = request.getfixturevalue(host)
    run(make_p(webui))
    assert shared.state.textinfo is None


def test_panels_are_per_run(webui):
    script = MemoGuardScript()
    first = script.run(make_p(webui, prompt="a red house"), 1, 1e-6)      # flagged
    second = script.run(make_p(webui, prompt="a blue boat"), 1, 1e6)      # ok
    a, b = panel_for(first.js()), panel_for(second.js())
    assert "LIKELY MEMORIZED" in a and "LIKELY MEMORIZED" not in b and a != b
    assert panel_for(processing.process_images(make_p(webui)).js()) == ""  # a run without MemoGuard: no panel
    assert panel_for("not json") == ""


def test_plot_has_axes_values_band_and_window(webui):
    calibrate_small()
    _, processed = run(make_p(webui, cfg_scale=7.0), window=2)
    html = panel_for(processed.js())
    assert "sampling step" in html and "score (RMS)" in html
    assert html.count("<text") >= 8                   # tick values on both axes
    assert 'class="memoguard-band"' in html and "benign band" in html
    assert 'class="memoguard-window"' in html and "steps 1-2" in html
    _, other_cfg = run(make_p(webui, cfg_scale=3.0))
    assert "benign band not drawn: it was sampled at cfg 7" in panel_for(other_cfg.js())


def test_plot_says_when_there_is_no_band(webui, tiny_model):
    shared.sd_model = b = other_model(webui, tiny_model)
    _, processed = run(make_p(b))
    html = panel_for(processed.js())
    assert "no band: this checkpoint is not calibrated" in html and 'class="memoguard-band"' not in html
    shared.sd_model = webui
    calibrate_small(band_prompts=0)
    _, processed = run(make_p(webui))
    assert "the calibration has none" in panel_for(processed.js())


def test_calibrate_button_reports_progress_and_result(webui, tiny_model):
    shown = list(calibration_glue.ui_calibrate(10, 2, 3, 128, 128))
    assert "Calibrated" in shown[-1] and weights_fingerprint(tiny_model.unet) in shown[-1]
    assert calibration_glue.store().path_for(weights_fingerprint(tiny_model.unet)).is_file()
    failed = list(calibration_glue.ui_calibrate(3, 2, 3, 128, 128))
    assert "calibration failed" in failed[-1] and "prompts" in failed[-1]


# -- delayed guidance (issue 10) ----------------------------------------------------------------
def one_flagged(webui):
    """A plain batch of two, its first-step scores, the higher image and a threshold between the two."""
    plain_monitor, plain = run(make_p(webui, batch_size=2))
    first = plain_monitor.results[0].trace.per_step()[0]
    return plain, first, int(first.argmax()), float(first.mean())


@pytest.mark.parametrize("host", ["webui", "forge"])
def test_guidance_delay_keeps_the_first_step_score_and_steers_only_flagged_images(host, request):
    webui = request.getfixturevalue(host)
    plain, first, high, threshold = one_flagged(webui)
    monitor, steered = run(make_p(webui, batch_size=2), threshold=threshold, mitigation="auto",
                          strategy="guidance_delay", delay=0.5)
    assert not monitor.errors
    record = monitor.results[0].mitigation
    assert record.strategy == "guidance_delay" and record.ran and record.delay_steps >= 1
    assert record.image_iterations[high] == record.delay_steps and record.image_iterations[1 - high] == 0
    trace = monitor.results[0].trace.per_step()
    assert trace[0].tolist() == pytest.approx(first.tolist(), rel=1e-6)  # scored before it steers
    assert torch.equal(steered.images[1 - high], plain.images[1 - high])  # not flagged: bit-identical
    assert not torch.equal(steered.images[high], plain.images[high])
    fields = [infotext_fields(t)["MemoGuard mitigation"] for t in steered.infotexts]
    assert fields[high] == f"auto guidance delayed {record.delay_steps} steps"
    assert fields[1 - high].startswith("auto not needed (first-step score") and "under the threshold" in fields[1 - high]


@pytest.mark.parametrize("host", ["webui", "forge"])
def test_guidance_delay_zero_steps_is_the_plain_run(host, request):
    webui = request.getfixturevalue(host)
    p = make_p(webui)
    plain = processing.process_images(p)
    # a delay that rounds to no step: the plain run, bit for bit
    monitor, steered = run(make_p(webui), mitigation="always", strategy="guidance_delay", delay=0.4 / p.steps)
    assert not monitor.errors and torch.equal(plain.images[0], steered.images[0])
    assert monitor.results[0].mitigation.delay_steps == 0
    # the slider's 0 is the strategy's measured default (guidance delay: 0.3 of the steps)
    monitor, _ = run(make_p(webui), mitigation="always", strategy="guidance_delay", delay=0.0)
    assert monitor.results[0].mitigation.delay_steps == round(0.3 * p.steps)


# -- opposite guidance and padding masking (issue 20) --------------------------------------------------------
@pytest.mark.parametrize("host", ["webui", "forge"])
def test_opposite_guidance_keeps_the_first_step_score_and_guides_flagged_images_away(host, request):
    webui = request.getfixturevalue(host)
    plain, first, high, threshold = one_flagged(webui)
    monitor, steered = run(make_p(webui, batch_size=2), threshold=threshold, mitigation="auto",
                          strategy="opposite_guidance", delay=0.5)
    _, delayed = run(make_p(webui, batch_size=2), threshold=threshold, mitigation="auto", strategy="guidance_delay",
                     delay=0.5)
    assert not monitor.errors
    record = monitor.results[0].mitigation
    assert record.strategy == "opposite_guidance" and record.early_scale == -3.0 and record.delay_steps >= 1
    assert monitor.results[0].trace.per_step()[0].tolist() == pytest.approx(first.tolist(), rel=1e-6)
    assert torch.equal(steered.images[1 - high], plain.images[1 - high])
    assert not torch.equal(steered.images[high], plain.images[high])
    assert not torch.equal(steered.images[high], delayed.images[high])  # away from the prompt, not just without it
    fields = [infotext_fields(t)["MemoGuard mitigation"] for t in steered.infotexts]
    assert fields[high] == f"auto guidance -3 for {record.delay_steps} steps"


@pytest.mark.parametrize("host", ["webui", "forge"])
def test_padding_masking_is_the_default_and_the_sampler_runs_the_masked_prompt(host, request):
    """A memorized caption of the bundled model: its padding zeroed, the sampler's first step scores the masked
    prompt, the infotext records both scores."""
    from memoguard.tiny.data import build_dataset
    from memoguard_a1111.script import DEFAULTS, ARG_NAMES
    assert dict(zip(ARG_NAMES, DEFAULTS))["strategy"] == "mask_padding"
    webui = request.getfixturevalue(host)
    caption = build_dataset(0).memorized_captions[0]
    plain_monitor, plain = run(make_p(webui, prompt=caption))
    monitor, masked = run(make_p(webui, prompt=caption), mitigation="always")
    assert not monitor.errors
    record = monitor.results[0].mitigation
    words = len(caption.replace(",", " ,").split())
    assert record.strategy == "mask_padding" and record.ran and record.masked == [77 - words - 2]
    assert record.after[0] < record.before[0]
    # the sampler's own first step ran with the masked prompt: its score is the one the record reports
    assert monitor.results[0].trace.per_step()[0].tolist() == pytest.approx(record.after, rel=1e-4)
    assert record.before == pytest.approx(plain_monitor.results[0].trace.per_step()[0].tolist(), rel=1e-5)
    assert not torch.equal(masked.images[0], plain.images[0])
    field = infotext_fields(masked.infotexts[0])["MemoGuard mitigation"]
    assert field == f"always padding masked {77 - words - 2} positions {record.before[0]:.4f} -> {record.after[0]:.4f}"
