"""The MemoGuard script on Forge with an SDXL checkpoint: dict conds whose "vector" Forge passes to
KModel.apply_model as y, checked against that apply_model directly."""
import pytest
import torch

from memoguard import eps_difference, step_score
from modules import processing
from modules.sd_samplers_kdiffusion import CompVisDenoiser
from test_script import PROMPT, infotext_fields, kdiffusion_start, make_p, run, seeds_noise
from test_sdxl import LONG_NEGATIVE, assert_explanation_is_the_gradient, conditioning


def euler_start(forge_xl, p):
    """x and sigma of the first Euler step, in k-diffusion's convention (x = x0 + sigma * eps) as KModel takes them."""
    sigma = CompVisDenoiser(forge_xl).get_sigmas(p.steps)[0]
    return seeds_noise(forge_xl, p) * sigma, sigma.expand(p.batch_size)


def kmodel_gap(forge_xl, x, sigma, negative=""):
    """eps(x, prompt) - eps(x, negative) from KModel.apply_model's denoised outputs, y = each conditioning's vector."""
    kmodel = forge_xl.forge_objects.unet.model
    cond, uncond = (conditioning(forge_xl, text, x.shape[0]) for text in (PROMPT, negative))
    denoised_cond = kmodel.apply_model(x, sigma, c_crossattn=cond["crossattn"], y=cond["vector"])
    denoised_uncond = kmodel.apply_model(x, sigma, c_crossattn=uncond["crossattn"], y=uncond["vector"])
    return eps_difference(denoised_cond, denoised_uncond, "x0", 1.0, sigma)


@pytest.mark.parametrize("negative", ["", LONG_NEGATIVE])
def test_forge_sdxl_score_is_the_kmodels_first_step_gap(forge_xl, negative):
    p = make_p(forge_xl, sampler_name="Euler", batch_size=2, negative_prompt=negative)
    monitor, processed = run(p)
    assert not monitor.errors
    with torch.no_grad():
        expected = step_score(kmodel_gap(forge_xl, *euler_start(forge_xl, p), negative))
    torch.testing.assert_close(monitor.results[0].trace.per_step()[0], expected, rtol=1e-4, atol=1e-6)
    assert [float(infotext_fields(text)["MemoGuard score"]) for text in processed.infotexts] == \
        pytest.approx(expected.tolist(), abs=1e-4)


def test_forge_sdxl_images_stay_bit_identical_with_monitor_and_explanation(forge_xl):
    plain = processing.process_images(make_p(forge_xl, batch_size=2))
    monitor, watched = run(make_p(forge_xl, batch_size=2), explain=True, explain_steps=2, window=2)
    assert not monitor.errors and monitor.image_explanations(0, 1)
    assert all(torch.equal(a, b) for a, b in zip(plain.images, watched.images))


@pytest.mark.parametrize("method", ["gradient_x_delta", "gradient_norm"])
def test_forge_sdxl_explanation_is_the_gaps_gradient_at_the_prompt_tokens(forge_xl, method):
    p = make_p(forge_xl, sampler_name="Euler")
    monitor, processed = run(p, explain=True, explain_method=method)
    assert not monitor.errors
    (got,) = monitor.image_explanations(0, 0)
    # the reference differentiates the same UNet and conditioning as A1111 serves them (eps, VP convention)
    assert_explanation_is_the_gradient(got, processed, forge_xl.xl, *kdiffusion_start(forge_xl, p))


def test_forge_sdxl_mitigation_lowers_the_gap_and_leaves_y_alone(forge_xl, monkeypatch):
    kmodel = forge_xl.forge_objects.unet.model
    ys = []  # y of every KModel call: sampling, and the mitigation's own evaluations
    apply_model = kmodel.apply_model
    monkeypatch.setattr(kmodel, "apply_model", lambda *args, **kw: ys.append(kw.get("y")) or apply_model(*args, **kw))
    p = make_p(forge_xl, sampler_name="Euler")
    monitor, _ = run(p, mitigation="always", strategy="minimize", max_iters=3, lr=0.1)
    assert not monitor.errors
    record = monitor.results[0].mitigation
    with torch.no_grad():
        before = step_score(kmodel_gap(forge_xl, *euler_start(forge_xl, p))).item()
    assert record.ran and record.before[0] == pytest.approx(before, rel=1e-4) and record.after[0] < record.before[0]
    # the sampler saw the optimised crossattn: its first recorded gap is the record's "after"
    assert monitor.results[0].trace.per_step()[0, 0].item() == pytest.approx(record.after[0], rel=1e-4)
    originals = [conditioning(forge_xl, text)["vector"][0] for text in (PROMPT, "")]
    assert ys and all(y is not None and any(torch.equal(row, v) for v in originals) for y in ys for row in y)
