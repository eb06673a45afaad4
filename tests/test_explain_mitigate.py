"""Explanation gradients against finite differences; mitigation lowers the gap and keeps BOS."""
import pytest
import torch

from memoguard.diffusers_model import load_model
from memoguard.explain import token_contributions
from memoguard.mitigate import minimize_embedding
from memoguard.sampling import initial_noise
from memoguard.score import l2_per_image


def _setup(model, prompts, seeds):
    cond, uncond = model.encode(prompts), model.encode([""])
    x = initial_noise(model, model.latent_shape(), seeds, model.device)
    return cond, uncond, x


def test_token_scores_match_finite_differences(random_model, random_model_dir):
    cond, uncond, x = _setup(random_model, ["a large red circle on the left"], [3])
    (contrib,) = token_contributions(random_model, cond, uncond, x, steps=1, total_steps=50)
    model64 = load_model(random_model_dir, dtype=torch.float64)  # finite differences need double precision
    t = model64.timesteps(50)[0]
    cond64, uncond64 = model64.encode(["a large red circle on the left"]), model64.encode([""])
    x64 = x.double()

    def gap(e):
        eps_c, eps_u = model64.eps_pair(x64, t, cond64, uncond64, e)
        return l2_per_image(eps_c - eps_u).sum()

    e = cond64.embedding.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(gap(e), [e])
    for pos, score in zip(contrib.positions, contrib.scores):
        # the directional derivative along the gradient's own direction is its norm
        direction = g[0, pos] / g[0, pos].norm()
        h = 1e-5
        plus, minus = cond64.embedding.clone(), cond64.embedding.clone()
        plus[0, pos] += h * direction
        minus[0, pos] -= h * direction
        fd = ((gap(plus) - gap(minus)) / (2 * h)).item()
        assert fd == pytest.approx(score, rel=1e-3)


def test_contributions_cover_prompt_tokens_only(random_model):
    cond, uncond, x = _setup(random_model, ["a blue ring , glacier anthem"], [0, 1])
    (contrib,) = token_contributions(random_model, cond, uncond, x[:1].repeat(1, 1, 1, 1))
    assert contrib.tokens == ["a", "blue", "ring", ",", "glacier", "anthem"]
    assert sum(contrib.shares) == pytest.approx(1.0)
    assert 0 not in contrib.positions  # BOS never shown


def test_multi_step_explanation_averages_over_steps(random_model):
    cond, uncond, x = _setup(random_model, ["a small green cross"], [5])
    one = token_contributions(random_model, cond, uncond, x, steps=1, total_steps=10)[0]
    three = token_contributions(random_model, cond, uncond, x, steps=3, total_steps=10)[0]
    assert one.tokens == three.tokens and one.scores != three.scores
    with pytest.raises(ValueError, match="steps must be"):
        token_contributions(random_model, cond, uncond, x, steps=11, total_steps=10)


def test_mitigation_lowers_gap_freezes_bos_and_holds_finished_images(tiny_model):
    from memoguard.tiny.data import build_dataset
    ds = build_dataset(0)
    prompts = [ds.memorized_captions[0], ds.memorized_captions[1]]
    cond, uncond, x = _setup(tiny_model, prompts, [0, 1])
    t = tiny_model.timesteps(20)[0]
    emb, rec = minimize_embedding(tiny_model, cond, uncond, x, t, target=0.0, max_iters=5)
    assert rec.ran and rec.iterations == 5 and rec.image_iterations == [5, 5]
    assert all(a < 0.8 * b for a, b in zip(rec.after, rec.before))
    bos = cond.frozen_mask
    assert torch.equal(emb[bos], cond.embedding[bos])
    assert not torch.equal(emb[~bos], cond.embedding[~bos])
    # a target between the two images' gaps: the lower one never moves
    lo = min(range(2), key=lambda i: rec.before[i])
    emb2, rec2 = minimize_embedding(tiny_model, cond, uncond, x, t, target=rec.before[lo] + 1e-6, max_iters=3)
    assert rec2.image_iterations[lo] == 0 and torch.equal(emb2[lo], cond.embedding[lo])


def test_mitigation_modes(random_model):
    cond, uncond, x = _setup(random_model, ["a red circle"], [0])
    t = random_model.timesteps(20)[0]
    emb, rec = minimize_embedding(random_model, cond, uncond, x, t, mode="off")
    assert not rec.ran and torch.equal(emb, cond.embedding)
    emb, rec = minimize_embedding(random_model, cond, uncond, x, t, mode="auto", threshold=1e9)
    assert not rec.ran and "under threshold" in rec.reason and torch.equal(emb, cond.embedding)
    with pytest.raises(ValueError, match="needs a threshold"):
        minimize_embedding(random_model, cond, uncond, x, t, mode="auto")
    with pytest.raises(ValueError, match="mode must be one of"):
        minimize_embedding(random_model, cond, uncond, x, t, mode="sometimes")
    emb, rec = minimize_embedding(random_model, cond, uncond, x, t, mode="auto", threshold=0.0, target=1e9)
    assert not rec.ran and "under target" in rec.reason and torch.equal(emb, cond.embedding)
