"""The MemoGuard script on an SDXL-shaped model: dict conditioning {"crossattn", "vector"} through the stand-in
WebUI, checked against the model's own apply_model."""
import pytest
import torch

from memoguard import step_score
from memoguard.score import raw_step_score
from modules import processing, prompt_parser
from modules.sd_samplers_timesteps import CompVisSampler
from test_script import PROMPT, infotext_fields, kdiffusion_start, make_p, run, seeds_noise

LONG_NEGATIVE = " ".join(["blurry"] * 80)  # two chunks against the prompt's one: the CFG denoiser calls the model twice


def conditioning(model, prompt, batch=1):
    """The prompt's conditioning at the model's image size (the size the stand-in WebUI samples at)."""
    height, width = model.image_size
    with torch.no_grad():
        return model.get_learned_conditioning(prompt_parser.SdConditioning([prompt] * batch, width=width, height=height))


def direct_gap(model, x, t, negative="", prompt=PROMPT):
    """eps(x_t, prompt) - eps(x_t, negative) from apply_model with the model's dict conditioning."""
    t = torch.as_tensor(t).expand(x.shape[0])
    with torch.no_grad():
        return (model.apply_model(x, t, conditioning(model, prompt, x.shape[0]))
                - model.apply_model(x, t, conditioning(model, negative, x.shape[0])))


@pytest.mark.parametrize("negative", ["", LONG_NEGATIVE])
def test_kdiffusion_score_is_the_models_first_step_gap(webui_xl, negative):
    p = make_p(webui_xl, sampler_name="Euler", batch_size=2, negative_prompt=negative)
    monitor, processed = run(p)
    x, t = kdiffusion_start(webui_xl, p)
    expected = step_score(direct_gap(webui_xl, x, t, negative))
    torch.testing.assert_close(monitor.results[0].trace.per_step()[0], expected, rtol=1e-4, atol=1e-6)
    assert [float(infotext_fields(text)["MemoGuard score"]) for text in processed.infotexts] == \
        pytest.approx(expected.tolist(), abs=1e-4)


def test_and_prompt_rows_stack_dicts_per_row_and_add_with_their_weights(webui_xl):
    p = make_p(webui_xl, sampler_name="Euler", batch_size=2, prompt="a red house AND a blue boat:0.5")
    monitor, _ = run(p)
    x, t = kdiffusion_start(webui_xl, p)
    expected = step_score(direct_gap(webui_xl, x, t, prompt="a red house")
                             + 0.5 * direct_gap(webui_xl, x, t, prompt="a blue boat"))
    torch.testing.assert_close(monitor.results[0].trace.per_step()[0], expected, rtol=1e-4, atol=1e-6)


def test_ddim_score_is_the_models_first_step_gap(webui_xl):
    p = make_p(webui_xl, sampler_name="DDIM", batch_size=2)
    monitor, _ = run(p)
    x, t = seeds_noise(webui_xl, p), CompVisSampler(webui_xl).timesteps(p.steps)[0]
    expected = step_score(direct_gap(webui_xl, x, t))
    torch.testing.assert_close(monitor.results[0].trace.per_step()[0], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_monitor_leaves_sdxl_images_bit_identical(webui_xl, sampler):
    plain = processing.process_images(make_p(webui_xl, sampler_name=sampler, batch_size=2))
    monitor, watched = run(make_p(webui_xl, sampler_name=sampler, batch_size=2), explain=True, window=2)
    assert not monitor.errors
    assert all(torch.equal(a, b) for a, b in zip(plain.images, watched.images))


def assert_explanation_is_the_gradient(got, processed, model, x, t):
    """The first-step token scores are the gap's gradient at the prompt's tokens, through model.apply_model: times
    (e_i - e_empty,i) for gradient x input (the WebUI's default), its norm for the paper's method."""
    t = torch.as_tensor(t).reshape(1)
    cond, uncond = conditioning(model, PROMPT), conditioning(model, "")
    emb = cond["crossattn"].clone().requires_grad_(True)
    with torch.enable_grad():
        gap = raw_step_score(model.apply_model(x, t, {**cond, "crossattn": emb}) - model.apply_model(x, t, uncond))
        (grad,) = torch.autograd.grad(gap.sum(), [emb])
    assert got.tokens == ["a", "red", "house", "on", "a", "hill"] and got.positions == [1, 2, 3, 4, 5, 6]
    assert sum(got.shares) == pytest.approx(1.0)
    if got.method == "gradient_norm":
        norms = grad[0].norm(dim=-1)[got.positions]
        assert got.shares == pytest.approx((norms / norms.sum()).tolist(), rel=1e-3)
    else:
        assert got.method == "gradient_x_delta"
        empty = uncond["crossattn"].expand_as(emb)
        want = (grad[0] * (emb - empty)[0]).sum(dim=-1)[got.positions]
        assert got.scores == pytest.approx(want.tolist(), rel=1e-3, abs=1e-7)
    assert infotext_fields(processed.infotexts[0])["MemoGuard tokens"].startswith(got.top(1)[0][0])


@pytest.mark.parametrize("method", ["gradient_x_delta", "gradient_norm"])
def test_explanation_is_the_gaps_gradient_at_the_prompt_tokens(webui_xl, method):
    p = make_p(webui_xl, sampler_name="Euler")
    monitor, processed = run(p, explain=True, explain_method=method)
    assert not monitor.errors
    (got,) = monitor.image_explanations(0, 0)
    assert_explanation_is_the_gradient(got, processed, webui_xl, *kdiffusion_start(webui_xl, p))


def test_mitigation_lowers_the_gap_and_leaves_the_vector_alone(webui_xl, monkeypatch):
    vectors = []  # "vector" of every model call: sampling, and the mitigation's own evaluations
    apply_model = webui_xl.apply_model
    monkeypatch.setattr(webui_xl, "apply_model",
                        lambda x, t, cond: vectors.append(cond["vector"]) or apply_model(x, t, cond))
    p = make_p(webui_xl, sampler_name="Euler")
    monitor, processed = run(p, mitigation="always", strategy="minimize", max_iters=3, lr=0.1)
    assert not monitor.errors
    record = monitor.results[0].mitigation
    x, t = kdiffusion_start(webui_xl, p)
    assert record.ran and record.before[0] == pytest.approx(step_score(direct_gap(webui_xl, x, t)).item(), rel=1e-4)
    assert record.after[0] < record.before[0]
    # the sampler saw the optimised crossattn: its first recorded gap is the record's "after"
    assert monitor.results[0].trace.per_step()[0, 0].item() == pytest.approx(record.after[0], rel=1e-4)
    originals = [conditioning(webui_xl, text)["vector"][0] for text in (PROMPT, "")]
    assert vectors and all(any(torch.equal(row, v) for v in originals) for call in vectors for row in call)
