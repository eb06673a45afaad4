"""The MemoGuard dropdown script on the stand-in WebUI playing Forge (post-CFG patch, inference mode)."""
import pytest
import torch

from memoguard import step_score
from memoguard_a1111 import forge as forge_module
from memoguard_a1111.monitor import ForgeRunMonitor
from modules import processing, script_callbacks, shared
from test_script import (PROMPT, assert_explanation_is_the_cores, core_first_step, infotext_fields, kdiffusion_start,
                         make_p, run)


def test_forge_is_detected_and_scored_through_the_post_cfg_patch(forge, tiny_model):
    p = make_p(forge, sampler_name="Euler", batch_size=2)
    shown = []  # the progress text as the next step's callback sees it
    script_callbacks.on_cfg_denoiser(lambda params: shown.append(shared.state.textinfo))
    monitor, processed = run(p)
    assert isinstance(monitor, ForgeRunMonitor)
    trace = monitor.results[0].trace
    x, t = kdiffusion_start(forge, p)
    expected = step_score(core_first_step(tiny_model, [PROMPT] * 2, x, t))
    torch.testing.assert_close(trace.per_step()[0], expected, rtol=1e-4, atol=1e-6)
    assert trace.per_step().shape == (p.steps, 2)
    fields = [infotext_fields(text) for text in processed.infotexts]
    assert [float(f["MemoGuard score"]) for f in fields] == pytest.approx(expected.tolist(), abs=1e-4)
    assert [f["MemoGuard verdict"] for f in fields] == [monitor.verdict(0, i).label for i in range(2)]
    assert shown[-1].startswith(f"MemoGuard step {p.steps - 1}: score ") and shared.state.textinfo is None
    assert not monitor.errors


def test_forge_images_stay_bit_identical_with_monitor_and_explanation(forge):
    plain = processing.process_images(make_p(forge, batch_size=2))
    monitor, watched = run(make_p(forge, batch_size=2), explain=True, explain_steps=2, window=2)
    assert all(torch.equal(a, b) for a, b in zip(plain.images, watched.images))
    assert not monitor.errors and monitor.image_explanations(0, 1)


def test_forge_patch_goes_on_a_clone_for_every_sampling(forge):
    untouched = forge.forge_objects_after_applying_lora.unet
    monitor, processed = run(make_p(forge, batch_size=2, n_iter=2))
    scores = [float(infotext_fields(t)["MemoGuard score"]) for t in processed.infotexts]
    assert len(set(scores)) == 4  # the second sampling (fresh forge_objects) was patched again
    assert "sampler_post_cfg_function" not in untouched.model_options
    assert forge.forge_objects.unet is not untouched
    assert forge.forge_objects.unet.model_options["sampler_post_cfg_function"] == [monitor.post_cfg]
    assert not any(script_callbacks.callback_map.values())


def test_forge_explanation_agrees_with_the_core_under_inference_mode(forge, tiny_model):
    p = make_p(forge, sampler_name="Euler")
    monitor, processed = run(p, explain=True)
    assert not monitor.errors
    (got,) = monitor.image_explanations(0, 0)
    x, t = kdiffusion_start(forge, p)
    assert_explanation_is_the_cores(got, processed, tiny_model, x, t)


def test_forge_mitigation_lowers_the_gap_and_the_sampler_uses_it(forge):
    plain = processing.process_images(make_p(forge))
    monitor, processed = run(make_p(forge), mitigation="always", strategy="minimize", max_iters=3, lr=0.1)
    assert not monitor.errors
    record = monitor.results[0].mitigation
    assert record.ran and record.iterations == 3 and record.after[0] < record.before[0]
    assert not torch.equal(plain.images[0], processed.images[0])
    assert infotext_fields(processed.infotexts[0])["MemoGuard mitigation"].startswith("always 3 iterations")
    assert monitor.results[0].trace.per_step()[0, 0].item() == pytest.approx(record.after[0], rel=1e-4)


@pytest.mark.parametrize("window", [1, 2])
def test_forge_cfg_1_scores_the_verdicts_steps_with_the_negative_pass_memoguard_runs(forge, tiny_model, window):
    """At CFG scale 1 Forge neither encodes the negative prompt nor runs its pass: MemoGuard does both for the steps
    its verdict reads, the score is the core's first-step gap against the negative, the image is untouched."""
    kmodel = forge.forge_objects.unet.model
    plain = processing.process_images(make_p(forge, cfg_scale=1.0, batch_size=2, negative_prompt="blurry"))
    calls = []
    apply_model = kmodel.apply_model
    kmodel.apply_model = lambda x, t, **kw: calls.append(x.shape[0]) or apply_model(x, t, **kw)
    p = make_p(forge, cfg_scale=1.0, batch_size=2, negative_prompt="blurry", sampler_name="Euler")
    monitor, processed = run(p, window=window)
    assert torch.equal(plain.images[0], processed.images[0]) and torch.equal(plain.images[1], processed.images[1])
    assert sum(calls) == 2 * p.steps + 2 * window  # the sampler's cond passes + one negative pass a scored step
    assert len(monitor._negatives) == 1  # the negative prompts encoded once for the whole generation
    x, t = kdiffusion_start(forge, p)
    expected = step_score(core_first_step(tiny_model, [PROMPT] * 2, x, t, negative="blurry"))
    trace = monitor.results[0].trace
    assert len(trace) == window and monitor.results[0].skipped_steps == list(range(window, p.steps))
    torch.testing.assert_close(trace.per_step()[0], expected, rtol=1e-4, atol=1e-6)
    fields = infotext_fields(processed.infotexts[0])
    assert fields["MemoGuard verdict"] != "unavailable" and "1 extra model call" in fields["MemoGuard note"]
    assert not monitor.errors


def test_forge_cfg_1_explains_against_the_negative_memoguard_encoded(forge, tiny_model):
    p = make_p(forge, cfg_scale=1.0, negative_prompt="blurry", sampler_name="Euler")
    monitor, processed = run(p, explain=True)
    (got,) = monitor.image_explanations(0, 0)
    assert got.method == "leave_one_out" and not monitor.errors
    x, t = kdiffusion_start(forge, p)
    # its gap is the score's: the prompt against the negative prompt at the first step
    expected = float(step_score(core_first_step(tiny_model, [PROMPT], x, t, negative="blurry"))[0])
    assert got.gap_before / got.elements ** 0.5 == pytest.approx(expected, rel=1e-4)
    assert infotext_fields(processed.infotexts[0])["MemoGuard explanation"] == "leave-one-out"


def test_forge_cfg_1_is_unavailable_not_zero_when_memoguards_pass_fails(forge, monkeypatch):
    def fails(*args):
        raise RuntimeError("no text encoder")
    monkeypatch.setattr(forge_module, "negative_conditioning", fails)
    plain = processing.process_images(make_p(forge, cfg_scale=1.0))
    monitor, processed = run(make_p(forge, cfg_scale=1.0), explain=True)
    assert "MemoGuard failed explaining tokens: RuntimeError: no text encoder" in processed.comments
    verdict = monitor.verdict(0, 0)
    assert not verdict.available and "CFG scale 1" in verdict.reason
    fields = infotext_fields(processed.infotexts[0])
    assert fields["MemoGuard verdict"] == "unavailable" and "MemoGuard score" not in fields
    assert "no text encoder" in fields["MemoGuard error"]
    assert monitor.results[0].skipped_steps == [0, 1, 2]
    assert torch.equal(plain.images[0], processed.images[0])


def test_forge_ngms_is_unavailable(forge):
    shared.opts.s_min_uncond_all = True
    monitor, _ = run(make_p(forge, s_min_uncond=1e9))
    verdict = monitor.verdict(0, 0)
    assert not verdict.available and "NGMS" in verdict.reason


def test_forge_hook_failure_keeps_the_image_and_reports(forge, monkeypatch):
    def broken(args):
        raise RuntimeError("boom")
    monkeypatch.setattr(forge_module, "guided_difference", broken)
    plain = processing.process_images(make_p(forge))
    monitor, processed = run(make_p(forge))  # Forge does not catch post-CFG errors: MemoGuard must
    assert torch.equal(plain.images[0], processed.images[0])
    assert "MemoGuard failed after the model call" in processed.comments and "boom" in processed.comments
    assert infotext_fields(processed.infotexts[0])["MemoGuard verdict"] == "unavailable"


def test_forge_quantized_weights_refuse_gradients_with_a_message(forge):
    class QuantizedWeight(torch.nn.Parameter):  # what GGUF / bitsandbytes checkpoints hold
        pass
    unet = forge.forge_objects.unet.model.diffusion_model
    with torch.inference_mode():
        unet.conv_in.weight = QuantizedWeight(unet.conv_in.weight.clone(), requires_grad=False)
    plain = processing.process_images(make_p(forge))
    monitor, processed = run(make_p(forge), explain=True)
    assert torch.equal(plain.images[0], processed.images[0])
    assert "QuantizedWeight" in processed.comments and "fp16/fp32 checkpoint" in processed.comments
    assert float(infotext_fields(processed.infotexts[0])["MemoGuard score"]) > 0  # scoring goes on


def test_forge_flow_model_is_scored_with_its_own_convention_and_refuses_gradients(forge, monkeypatch):
    p = make_p(forge)
    eps_p = make_p(forge)
    run(eps_p)
    monkeypatch.setattr(forge.forge_objects.unet.model.predictor, "prediction_type", "const")  # Forge: SD3 / Flux
    monitor, processed = run(p, explain=True)
    assert not monitor.errors and not monitor.image_explanations(0, 0)  # not explained, and said so
    assert "tokens not explained: on a rectified-flow model" in infotext_fields(processed.infotexts[0])["MemoGuard note"]
    # a flow read as x = x0 + sigma * v: the same denoised outputs are the same difference, of velocities (the
    # noise difference (1 - sigma)(v_c - v_u) would vanish where flow samplers start, at sigma 1)
    torch.testing.assert_close(monitor.results[0].trace.per_step()[0],
                               eps_p.memoguard.results[0].trace.per_step()[0], rtol=1e-4, atol=1e-7)


def test_forge_flow_model_mitigates_with_the_best_schedule_instead_of_a_prompt_strategy(forge, monkeypatch):
    """Forge Neo's Flux or Anima with the panel's default strategy (padding masking, which needs the prompt's
    words): the opposite guidance schedule steers it instead, and the infotext says so."""
    plain = processing.process_images(make_p(forge))
    monkeypatch.setattr(forge.forge_objects.unet.model.predictor, "prediction_type", "const")
    monitor, processed = run(make_p(forge), mitigation="always", strategy="mask_padding")
    record = monitor.results[0].mitigation
    assert record.strategy == "opposite_guidance" and record.ran and not monitor.errors
    fields = infotext_fields(processed.infotexts[0])
    assert fields["MemoGuard mitigation"].startswith("always guidance -3 for ")
    assert "mitigation opposite_guidance instead of mask_padding" in fields["MemoGuard note"]
    assert not torch.equal(plain.images[0], processed.images[0])


def test_forge_flow_model_at_cfg_1_is_scored_with_the_negative_pass_memoguard_runs(forge, monkeypatch):
    """A guidance-distilled flow model on Forge Neo (Flux dev, Z-Image Turbo) samples at CFG scale 1: MemoGuard runs
    the negative pass itself, also where the text engine hands one (1, L, C) tensor a prompt (Neo's Anima)."""
    p = make_p(forge, cfg_scale=1.0, batch_size=2, negative_prompt="blurry")
    plain = processing.process_images(make_p(forge, cfg_scale=1.0, batch_size=2, negative_prompt="blurry"))
    monkeypatch.setattr(forge.forge_objects.unet.model.predictor, "prediction_type", "const")
    monitor, processed = run(p)
    assert all(torch.equal(a, b) for a, b in zip(plain.images, processed.images)) and not monitor.errors
    fields = infotext_fields(processed.infotexts[0])
    assert fields["MemoGuard verdict"] != "unavailable" and "1 extra model call" in fields["MemoGuard note"]
    encode = forge_module.negative_conditioning
    monkeypatch.setattr(forge_module, "negative_conditioning", lambda *a: list(encode(*a)[:, None]))
    listed, _ = run(make_p(forge, cfg_scale=1.0, batch_size=2, negative_prompt="blurry"))
    torch.testing.assert_close(listed.results[0].trace.per_step(), monitor.results[0].trace.per_step())
