"""The host contract (memoguard.hosts) and the Denoiser split, on a small cross-attention model built here."""

import pytest
import torch

from memoguard.calibration import Calibration
from memoguard.errors import MemoGuardError
from memoguard.explain import token_contributions
from memoguard.hosts import (CHUNK, HostSettings, chunked_encoding, coefficients_kdiffusion,
                             combine_rows, denoised_difference, empty_encoding, failure_message, is_out_of_memory,
                             noise_level_vp, prediction_name, early_guidance,
                             cond_for_early_guidance)
from memoguard.mitigate import minimize_embedding
from memoguard.model import WORD_START, Denoiser, Interrupted, sentencepiece_word_ends, word_numbers
from memoguard.score import ScoreTrace, coefficients_vp, to_eps
from memoguard.verdict import verdict_for


class CrossAttentionDenoiser(Denoiser):
    """x0-predicting (k-diffusion) toy: one cross-attention layer over the prompt, so the output depends on
    every position and on the batch rows independently; counts its calls."""

    parameterization = "x0"

    def __init__(self, channels=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.q = torch.randn(4, channels, generator=g)
        self.v = torch.randn(channels, 4, generator=g)
        self.calls = []

    def raw_prediction(self, x, t, embedding, extra):
        self.calls.append((x.shape[0], embedding.shape[1]))
        flat = x.flatten(2).transpose(1, 2)                       # (B, HW, 4)
        attention = torch.softmax(flat @ self.q @ embedding.transpose(1, 2), dim=-1)
        out = (attention @ embedding @ self.v).transpose(1, 2).reshape(x.shape)
        return x * 0.5 + torch.tanh(out) / (1 + t.reshape(-1, 1, 1, 1))

    def coefficients(self, t):
        return coefficients_kdiffusion(t)


def encodings(batch=3, chunks=1, uncond_chunks=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    cond = chunked_encoding(torch.randn(batch, CHUNK * chunks, 8, generator=g))
    uncond = empty_encoding(torch.randn(1, CHUNK * uncond_chunks, 8, generator=g))
    x = torch.randn(batch, 4, 4, 4, generator=g) * 3
    return cond, uncond, x


def test_denoised_difference_is_the_eps_gap():
    x = torch.randn(2, 4, 3, 3)
    d_c, d_u = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    sigma = torch.tensor([0.7, 0.3])
    alpha, s = coefficients_kdiffusion(sigma)
    expected = to_eps(d_c, "x0", x, alpha, s) - to_eps(d_u, "x0", x, alpha, s)
    torch.testing.assert_close(denoised_difference(d_c, d_u, sigma.reshape(-1, 1, 1, 1)), expected)


def test_noise_levels_and_prediction_names():
    abar = torch.linspace(0.99, 0.01, 1000)
    alpha, sigma = coefficients_vp(abar, torch.tensor([500]))
    assert noise_level_vp(abar, 500) == pytest.approx(float(sigma / alpha))
    assert [prediction_name(k) for k in ("epsilon", "EPS", "v_prediction", "V_PREDICTION_EDM", "const", "FLUX",
                                         "FLOW", "edm", None)] == ["eps", "eps", "v", "v", "flow", "flow", "flow",
                                                                  "edm", None]


def test_combine_rows_weights_and_sub_prompts_per_image():
    rows = torch.arange(4.0).reshape(4, 1)
    out = combine_rows(rows, [[1.0], [0.5, 2.0], [1.0]])
    assert out.flatten().tolist() == [0.0, 0.5 * 1 + 2.0 * 2, 3.0]


def test_early_guidance_steers_only_the_chosen_images_at_the_early_scale():
    guided, cond, uncond = torch.zeros(3, 2), torch.full((3, 2), 3.0), torch.ones(3, 2)
    marked = torch.tensor([False, True, False])
    assert early_guidance(guided, cond, uncond, marked, 0.0)[:, 0].tolist() == [0, 1, 0]  # delayed: uncond
    assert early_guidance(guided, cond, uncond, marked, -3.0)[:, 0].tolist() == [0, 1 - 3 * 2, 0]  # away from cond
    # a host that replaces the cond prediction before its own CFG (u + w (c' - u)) gets the same guided prediction
    w = 7.0
    c_prime = cond_for_early_guidance(cond, uncond, -3.0, w)
    torch.testing.assert_close(uncond + w * (c_prime - uncond), uncond - 3.0 * (cond - uncond))
    assert torch.equal(cond_for_early_guidance(cond, uncond, 0.0, w), uncond)


def test_chunked_encoding_freezes_every_bos_and_refuses_odd_lengths():
    enc = chunked_encoding(torch.zeros(2, 2 * CHUNK, 8), extra={"y": torch.ones(1, 5)})
    assert enc.frozen_mask[:, [0, CHUNK]].all() and int(enc.frozen_mask.sum()) == 4
    assert enc.prompt_mask.sum() == 2 * (2 * CHUNK - 2) and enc.extra["y"].shape == (2, 5)
    uncond = empty_encoding(torch.zeros(1, CHUNK, 8))
    assert not uncond.prompt_mask.any() and not uncond.frozen_mask.any()
    with pytest.raises(ValueError, match="multiple of 77"):
        chunked_encoding(torch.zeros(1, 80, 8))


def test_a_negative_longer_than_the_prompt_is_evaluated_apart_not_refused():
    model = CrossAttentionDenoiser()
    cond, uncond, x = encodings(chunks=1, uncond_chunks=2)
    t = torch.tensor(2.0)
    eps_c, eps_u = model.eps_pair(x, t, cond, uncond)
    assert model.calls == [(3, CHUNK), (3, 2 * CHUNK)]
    torch.testing.assert_close(eps_u, model.eps(x, t, uncond.embedding.expand(3, -1, -1)))
    torch.testing.assert_close(eps_c, model.eps(x, t, cond.embedding))
    contributions = token_contributions(model, cond, uncond, x, steps=1, total_steps=1, timesteps=[t],
                                        method="gradient_x_delta")
    assert len(contributions) == 3 and all(len(c.tokens) == CHUNK - 1 for c in contributions)


def test_explanation_and_minimization_do_not_depend_on_grad_batch():
    model = CrossAttentionDenoiser()
    cond, uncond, x = encodings(batch=4)
    t = torch.tensor(3.0)
    one, all_ = (token_contributions(model, cond, uncond, x, steps=1, total_steps=1, timesteps=[t],
                                     method="gradient_x_delta", grad_batch=n) for n in (1, 4))
    for a, b in zip(one, all_):
        assert a.scores == pytest.approx(b.scores, rel=1e-4, abs=1e-6)
    model.calls.clear()
    emb1, rec1 = minimize_embedding(model, cond, uncond, x, t, lr=0.1, max_iters=3, grad_batch=1)
    per_image_calls = [c for c in model.calls if c[0] == 1]
    emb4, rec4 = minimize_embedding(model, cond, uncond, x, t, lr=0.1, max_iters=3, grad_batch=4)
    torch.testing.assert_close(emb1, emb4, rtol=1e-4, atol=1e-5)
    assert rec1.after == pytest.approx(rec4.after, rel=1e-4) and rec1.iterations == rec4.iterations == 3
    assert len(per_image_calls) == 4 * 4  # 3 iterations + the last measurement, one image at a time


def test_should_stop_interrupts_explanation_and_minimization():
    model = CrossAttentionDenoiser()
    cond, uncond, x = encodings(batch=2)
    t = torch.tensor(1.0)
    asked = []

    def stop_at_third():
        asked.append(1)
        return len(asked) >= 3
    with pytest.raises(Interrupted):
        minimize_embedding(model, cond, uncond, x, t, max_iters=50, should_stop=stop_at_third)
    assert len(asked) == 3
    with pytest.raises(Interrupted):
        token_contributions(model, cond, uncond, x, steps=1, total_steps=1, timesteps=[t], should_stop=lambda: True)


def test_failure_messages_name_out_of_memory_and_interrupts():
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
    assert is_out_of_memory(oom) and is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert not is_out_of_memory(ValueError("bad"))
    assert "ran out of memory explaining tokens" in failure_message("explaining tokens", oom)
    assert "interrupted" in failure_message("mitigating", Interrupted("x"))
    assert failure_message("mitigating", KeyError("k")).startswith("MemoGuard failed mitigating: KeyError")


def test_host_settings_check_every_field_and_resolve_the_threshold():
    for bad in (dict(window=0), dict(fpr=1.5), dict(threshold=-1.0), dict(mitigation="sometimes"),
                dict(strategy="prayer"), dict(delay=1.0), dict(early_scale=1.0), dict(explain_method="magic"),
                dict(lr=0)):
        with pytest.raises(ValueError):
            HostSettings(**bad)
    calibration = Calibration("m", [float(v) for v in range(100)])
    assert HostSettings(threshold=0.5).threshold_from(calibration) == 0.5
    assert HostSettings(fpr=0.1).threshold_from(calibration) == calibration.threshold(0.1)
    assert HostSettings().threshold_from(None) is None
    assert HostSettings(mitigation="auto", strategy="minimize").changes_prompt
    assert HostSettings(mitigation="always", strategy="mask_padding").changes_prompt and not HostSettings().changes_prompt
    assert HostSettings(mitigation="always").delays and not HostSettings().delays
    assert HostSettings(mitigation="always", strategy="opposite_guidance").delays
    # a schedule's early steps: the measured defaults per strategy unless the user set a delay
    assert HostSettings().early_steps("opposite_guidance") == (0.2, -3.0)
    assert HostSettings().early_steps("guidance_delay") == (0.3, 0.0)
    assert HostSettings(delay=0.5, early_scale=-1.0).early_steps("opposite_guidance") == (0.5, -1.0)


def test_verdicts_are_always_one_per_image():
    trace = ScoreTrace()
    trace.record(0, torch.ones(2, 1, 2, 2))
    assert len(verdict_for(trace, images=2)) == 2
    with pytest.raises(ValueError, match="holds 2 images, not 3"):
        verdict_for(trace, images=3)
    missing = ScoreTrace()
    missing.mark_unavailable("cfg 1")
    assert [v.label for v in verdict_for(missing, images=4)] == ["unavailable"] * 4
    with pytest.raises(TypeError):
        verdict_for(missing)  # the image count is never guessed


def test_a_bare_denoiser_needs_the_hosts_timestep():
    model = CrossAttentionDenoiser()
    cond, uncond, x = encodings(batch=1)
    with pytest.raises(MemoGuardError, match="pass the step's timesteps"):
        token_contributions(model, cond, uncond, x, steps=1, total_steps=1)
    assert not hasattr(model, "encode") and not hasattr(model, "timesteps")


def test_a_schedule_made_under_inference_mode_serves_the_backward_pass():
    """ComfyUI computes its sigmas under torch.inference_mode; the Token node hands them to the core as they are."""
    model = CrossAttentionDenoiser()
    cond, uncond, x = encodings(batch=2)
    with torch.inference_mode():
        sigmas = torch.tensor([5.0, 2.0, 0.0]) * 1
    contributions = token_contributions(model, cond, uncond, x, steps=1, total_steps=1, timesteps=sigmas[:1],
                                        method="gradient_x_delta")
    assert all(any(s != 0 for s in c.scores) for c in contributions)


def test_words_are_read_alike_from_clip_bpe_and_t5_sentencepiece():
    """ComfyUI's tokenizers of 'a (purple:1.2) ring, lighthouse poster': its word ids are weights segments, not
    words; CLIP ends a word with </w>, T5 starts one with a word-start mark and splits punctuation apart."""
    clip = ["<|startoftext|>", "a</w>", "purple</w>", "ring</w>", ",</w>", "light", "house</w>", "poster</w>",
            "<|endoftext|>"]
    t5 = [f"{WORD_START}", "a", f"{WORD_START}purple", f"{WORD_START}", "ring", ",", f"{WORD_START}light", "house",
          f"{WORD_START}poster", "</s>", "<pad>"]
    clip_segments, t5_segments = [0, 1, 2, 3, 3, 3, 3, 3, 0], [1, 1, 2, 3, 3, 3, 3, 3, 3, 0, 0]
    assert word_numbers([n.endswith("</w>") for n in clip], [s > 0 for s in clip_segments]) == [-1, 0, 1, 2, 3, 4, 4,
                                                                                                5, -1]
    assert word_numbers(sentencepiece_word_ends(t5, t5_segments), [s > 0 for s in t5_segments]) == [0, 0, 1, 2, 2, 3,
                                                                                                    4, 4, 5, -1, -1]


def test_a_cut_word_leaves_its_punctuation_to_the_word_before_and_never_joins_two_words():
    from memoguard.hosts import cut_out
    text = "a purple ring, sky,cloud"
    span = lambda word: (text.index(word), text.index(word) + len(word))
    assert cut_out(text, [span("ring")]) == "a purple, sky,cloud"
    comma = text.rindex(",")
    assert cut_out(text, [(comma, comma + 1)]) == "a purple ring, sky cloud"
    assert cut_out(text, [span("a"), span("ring")]) == " purple, sky,cloud"
