"""The MemoGuard dropdown script inside the stand-in WebUI, checked against the core on the same model."""
import math

import pytest
import torch

from memoguard import step_score, token_contributions
from memoguard_a1111 import monitor as monitor_module
from memoguard_a1111.script import ARG_NAMES, DEFAULTS, MemoGuardScript, panel_for
from modules import processing, script_callbacks, shared
from modules.sd_samplers_kdiffusion import CompVisDenoiser
from modules.sd_samplers_timesteps import CompVisSampler

PROMPT = "a red house on a hill"


def make_p(webui, **kw):
    return processing.StableDiffusionProcessingTxt2Img(**{"prompt": PROMPT, "steps": 3, "seed": 3, "sd_model": webui, **kw})


def run(p, **settings):
    script = MemoGuardScript()
    args = [settings.get(name, default) for name, default in zip(ARG_NAMES, DEFAULTS)]
    processed = script.run(p, *args)
    return p.memoguard, processed  # the run's RunMonitor travels with p


def infotext_fields(text):
    """The last infotext line's "key: value" pairs; JSON-quoted values (holding commas or colons) unquoted."""
    import json
    parts, current, quoted = [], "", False
    for ch in text.splitlines()[-1]:
        quoted = not quoted if ch == '"' else quoted
        if ch == "," and not quoted:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    parts.append(current.strip())
    pairs = dict(part.split(": ", 1) for part in parts if part)
    return {k: json.loads(v) if v.startswith('"') else v for k, v in pairs.items()}


def assert_explanation_is_the_cores(got, processed, tiny_model, x, t):
    """The script's first-step token contributions equal the core's at the same x and t, and reach the infotext."""
    core = core_on_schedule(tiny_model, torch.as_tensor(t).reshape(1))
    # the WebUI re-encodes the prompt through its own conditioning function: its default is leave-one-out, which the
    # core computes alike by re-encoding the token ids
    assert got.method == "leave_one_out"
    (want,) = token_contributions(core, core.encode([PROMPT]), core.encode([""]), x, steps=1, total_steps=1,
                                  method=got.method)
    assert got.tokens == want.tokens == ["a", "red", "house", "on", "a", "hill"]
    # leave-one-out scores are differences of two gaps: float32 noise is absolute, not relative
    assert got.scores == pytest.approx(want.scores, rel=1e-3, abs=2e-6)
    fields = infotext_fields(processed.infotexts[0])
    assert fields["MemoGuard tokens"].startswith(got.top(1)[0][0]) and fields["MemoGuard explanation"] == got.method_name


def seeds_noise(webui, p):
    return torch.stack([torch.randn(webui.latent_shape, generator=torch.Generator().manual_seed(p.seed + i))
                        for i in range(p.batch_size)])


def core_first_step(tiny_model, prompts, x, t, negative=""):
    """The core's gap on the diffusers model: eps_pair at (x, t), one row per prompt."""
    cond, uncond = tiny_model.encode(prompts), tiny_model.encode([negative])
    with torch.no_grad():
        eps_c, eps_u = tiny_model.eps_pair(x, torch.as_tensor(t), cond, uncond)
    return eps_c - eps_u


def kdiffusion_start(webui, p):
    """x and (fractional) timestep of the first Euler step, in the VP convention of the diffusers model."""
    wrap = CompVisDenoiser(webui)
    sigma = wrap.get_sigmas(p.steps)[0]
    return seeds_noise(webui, p) * sigma / (sigma ** 2 + 1).sqrt(), wrap.sigma_to_t(sigma.reshape(1))[0]


def test_kdiffusion_score_is_the_cores_first_step_gap(webui, tiny_model):
    p = make_p(webui, sampler_name="Euler", batch_size=2)
    monitor, processed = run(p)
    trace = monitor.results[0].trace
    x, t = kdiffusion_start(webui, p)
    expected = step_score(core_first_step(tiny_model, [PROMPT] * 2, x, t))
    torch.testing.assert_close(trace.per_step()[0], expected, rtol=1e-4, atol=1e-6)
    assert trace.per_step().shape == (p.steps, 2)
    assert trace.per_step()[0, 0] != trace.per_step()[0, 1]  # two seeds, two images, two scores
    fields = [infotext_fields(text) for text in processed.infotexts]
    assert [float(f["MemoGuard score"]) for f in fields] == pytest.approx(expected.tolist(), abs=1e-4)
    assert [f["MemoGuard verdict"] for f in fields] == [monitor.verdict(0, i).label for i in range(2)]


def core_on_schedule(tiny_model, timesteps):
    """The core's diffusers model, same weights, sampling on the stand-in sampler's schedule."""
    cls = type("OnSchedule", (type(tiny_model),), {"timesteps": lambda self, steps: timesteps})
    core = cls.__new__(cls)
    core.__dict__.update(tiny_model.__dict__)
    return core


def test_ddim_scores_match_the_core_sampler_at_every_step(webui, tiny_model):
    from memoguard.sampling import sample
    p = make_p(webui, sampler_name="DDIM", batch_size=2, steps=4)
    monitor, _ = run(p)
    core = core_on_schedule(tiny_model, CompVisSampler(webui).timesteps(p.steps))
    result = sample(core, core.encode([PROMPT] * 2), core.encode([""]), seeds_noise(webui, p), steps=p.steps, guidance=p.cfg_scale)
    torch.testing.assert_close(monitor.results[0].trace.per_step(), result.trace.per_step(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("host", ["webui", "forge"])
def test_and_prompt_rows_are_grouped_per_image_and_weighted(host, tiny_model, request):
    """A1111 lays out one cond row per sub-prompt; Forge scales its CFG the same way: one expected score."""
    webui = request.getfixturevalue(host)
    p = make_p(webui, sampler_name="Euler", batch_size=2, prompt="a red house AND a blue boat:0.5")
    monitor, _ = run(p)
    x, t = kdiffusion_start(webui, p)
    first = core_first_step(tiny_model, ["a red house"] * 2, x, t)
    second = core_first_step(tiny_model, ["a blue boat"] * 2, x, t)
    expected = step_score(first + 0.5 * second)
    torch.testing.assert_close(monitor.results[0].trace.per_step()[0], expected, rtol=1e-4, atol=1e-6)


def test_long_prompt_over_75_tokens_is_scored(webui, tiny_model):
    prompt = " ".join(["house"] * 80)
    p = make_p(webui, sampler_name="Euler", prompt=prompt)
    monitor, _ = run(p, explain=True)
    x, t = kdiffusion_start(webui, p)
    expected = step_score(core_first_step(tiny_model, [prompt], x, t))
    torch.testing.assert_close(monitor.results[0].trace.per_step()[0], expected, rtol=1e-4, atol=1e-6)
    (contributions,) = monitor.image_explanations(0, 0)
    assert len(contributions.tokens) == 80 and contributions.positions[75] == 78  # second chunk after BOS/EOS


def test_monitor_leaves_images_bit_identical(webui):
    plain = processing.process_images(make_p(webui, batch_size=2))
    _, watched = run(make_p(webui, batch_size=2), explain=True, explain_steps=2, window=2)
    assert all(torch.equal(a, b) for a, b in zip(plain.images, watched.images))


def test_hires_pass_is_not_scored_and_the_infotext_says_so(webui):
    plain = processing.process_images(make_p(webui, enable_hr=True))
    monitor, watched = run(make_p(webui, enable_hr=True))
    _, first_pass_only = run(make_p(webui))
    got, unhired = infotext_fields(watched.infotexts[0]), infotext_fields(first_pass_only.infotexts[0])
    assert got["MemoGuard hires pass"] == "not scored" and "MemoGuard hires pass" not in unhired
    assert "hires-fix pass is not scored" in watched.comments
    assert len(monitor.results[0].trace) == 3 and got["MemoGuard score"] == unhired["MemoGuard score"]
    assert torch.equal(plain.images[0], watched.images[0])


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_explanation_agrees_with_the_core(webui, tiny_model, sampler):
    p = make_p(webui, sampler_name=sampler)
    monitor, processed = run(p, explain=True)
    (got,) = monitor.image_explanations(0, 0)
    if sampler == "Euler":
        x, t = kdiffusion_start(webui, p)
    else:
        x, t = seeds_noise(webui, p), CompVisSampler(webui).timesteps(p.steps)[0]
    assert_explanation_is_the_cores(got, processed, tiny_model, x, t)


def test_ngms_on_the_first_step_makes_the_score_unavailable(webui):
    shared.opts.s_min_uncond_all = True
    p = make_p(webui, s_min_uncond=1e9)
    monitor, processed = run(p)
    verdict = monitor.verdict(0, 0)
    assert not verdict.available and "NGMS" in verdict.reason
    fields = infotext_fields(processed.infotexts[0])
    assert fields["MemoGuard verdict"] == "unavailable" and "MemoGuard score" not in fields
    assert "NGMS" in processed.comments


def test_ngms_on_odd_steps_keeps_the_first_step_score(webui):
    p = make_p(webui, s_min_uncond=1e9, steps=5)
    monitor, _ = run(p)
    result = monitor.results[0]
    assert result.skipped_steps == [1, 3] and result.trace.step_indices() == [0, 2, 4]
    assert monitor.verdict(0, 0).available


def test_skip_early_cfg_is_unavailable_not_zero(webui):
    shared.opts.skip_early_cond = 0.5
    monitor, processed = run(make_p(webui, steps=4))
    verdict = monitor.verdict(0, 0)
    assert not verdict.available and "Skip Early CFG" in verdict.reason


def test_batch_count_gives_each_image_its_own_score(webui):
    p = make_p(webui, batch_size=2, n_iter=2)
    monitor, processed = run(p)
    scores = [float(infotext_fields(t)["MemoGuard score"]) for t in processed.infotexts]
    assert len(set(scores)) == 4
    assert scores[2:] == pytest.approx(monitor.results[1].trace.score().tolist(), abs=1e-4)
    assert panel_for(processed.js()).count('class="memoguard-image') == 4


def test_callbacks_are_removed_after_the_run_and_after_an_interrupt(webui):
    run(make_p(webui))
    assert not any(script_callbacks.callback_map.values())
    shared.state.interrupted = True
    with pytest.raises(BaseException):
        run(make_p(webui))
    assert not any(script_callbacks.callback_map.values())


def test_a_failure_inside_memoguard_does_not_break_the_generation(webui, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(monitor_module, "guided_difference", broken)
    plain = processing.process_images(make_p(webui))
    monitor, processed = run(make_p(webui))
    assert torch.equal(plain.images[0], processed.images[0])
    assert "MemoGuard failed" in processed.comments and "boom" in processed.comments
    assert "boom" in panel_for(processed.js()) and not script_callbacks.reported  # caught by MemoGuard itself
    assert "boom" in infotext_fields(processed.infotexts[0])["MemoGuard error"]  # API users see it too


def test_mitigation_lowers_the_first_step_gap_and_is_recorded(webui):
    plain = processing.process_images(make_p(webui))
    monitor, processed = run(make_p(webui), mitigation="always", strategy="minimize", max_iters=3, lr=0.1)
    record = monitor.results[0].mitigation
    assert record.ran and record.iterations == 3 and record.after[0] < record.before[0]
    assert not torch.equal(plain.images[0], processed.images[0])
    assert infotext_fields(processed.infotexts[0])["MemoGuard mitigation"].startswith("always 3 iterations")
    # the sampler saw the optimised prompt: its first recorded gap is the record's "after"
    assert monitor.results[0].trace.per_step()[0, 0].item() == pytest.approx(record.after[0], rel=1e-4)


def test_auto_mitigation_without_threshold_or_calibration_says_so_and_generation_runs(webui, tiny_model):
    from test_issue9 import other_model
    shared.sd_model = b = other_model(webui, tiny_model)  # no calibration (the bundled model has one)
    plain = processing.process_images(make_p(b))
    monitor, processed = run(make_p(b), mitigation="auto", strategy="minimize")
    assert torch.equal(plain.images[0], processed.images[0])
    got = infotext_fields(processed.infotexts[0])
    assert got["MemoGuard mitigation"] == "auto not run (no calibration of this checkpoint and no threshold)"
    assert got["MemoGuard verdict"] == "uncalibrated"


def test_threshold_flags_and_auto_mitigation_runs_only_when_flagged(webui):
    monitor, processed = run(make_p(webui), threshold=1e-6, mitigation="auto", strategy="minimize", max_iters=2)
    assert monitor.verdict(0, 0).flagged
    assert infotext_fields(processed.infotexts[0])["MemoGuard verdict"] == "flagged"
    assert monitor.results[0].mitigation.ran
    monitor, _ = run(make_p(webui), threshold=1e6, mitigation="auto", strategy="minimize")
    assert not monitor.results[0].mitigation.ran


def test_script_args_in_documented_order_with_defaults_for_missing_ones():
    from memoguard_a1111.script import settings_from_args
    s = settings_from_args([3, 0.2])
    assert (s.window, s.threshold, s.mitigation, s.lr, s.max_iters) == (3, 0.2, "off", 0.05, 10)
    assert settings_from_args([1, 0]).threshold is None
    assert math.isclose(settings_from_args([1, 0, "", 0.05]).fpr, 0.05)


def test_explanation_hint_names_the_method_as_the_infotext_does(webui):
    """The control's hint and the infotext's `MemoGuard explanation` use the same name for what auto runs."""
    from memoguard.explain import METHOD_NAMES
    from memoguard_a1111.script import CONTROLS
    hint = next(c[4] for c in CONTROLS if c[0] == "explain_method")
    _, processed = run(make_p(webui), explain=True)
    used = infotext_fields(processed.infotexts[0])["MemoGuard explanation"]
    assert used == METHOD_NAMES["leave_one_out"] and f"auto = {used}" in hint


def test_explanation_takes_a_words_pieces_together_as_the_core_does(webui, tiny_model):
    prompt = "a red parable on a hill"  # "parable" is two BPE pieces
    p = make_p(webui, sampler_name="Euler", prompt=prompt)
    monitor, processed = run(p, explain=True)
    (got,) = monitor.image_explanations(0, 0)
    # re-encoded by the WebUI as on the command line and in ComfyUI: no note on the method
    assert "tokens: leave-one-out</div>" in panel_for(processed.js())
    x, t = kdiffusion_start(webui, p)
    core = core_on_schedule(tiny_model, torch.as_tensor(t).reshape(1))
    enc = core.encode([prompt])
    assert len(enc.prompt_tokens(0)) == 7 and len(enc.word_groups(0)) == 6
    (want,) = token_contributions(core, enc, core.encode([""]), x, steps=1, total_steps=1, method=got.method)
    assert got.tokens == want.tokens == ["a", "red", "parable", "on", "a", "hill"]
    assert got.scores == pytest.approx(want.scores, rel=1e-3, abs=2e-6)


def test_padding_masking_starts_from_the_first_step_the_webui_scored(webui, monkeypatch):
    """The adapter scores the first step to decide (cond and uncond in one model call); the core starts from those
    scores and adds only the masked prompt's call: two of MemoGuard's own model calls an iteration."""
    calls = []
    inner = monitor_module.WebUIModel.raw_prediction
    monkeypatch.setattr(monitor_module.WebUIModel, "raw_prediction",
                        lambda self, *a: calls.append(a[0].shape[0]) or inner(self, *a))
    monitor, _ = run(make_p(webui, sampler_name="Euler", batch_size=2), mitigation="always", strategy="mask_padding")
    record = monitor.results[0].mitigation
    assert record.ran and not monitor.errors
    assert calls == [4, 2]  # 2 images x (cond, uncond), then the 2 masked prompts
