"""Every eps conversion, by construction from known x0 and eps, and by hand-computed cases."""
import math

import numpy as np
import pytest
import torch

from memoguard.model import ddim_step
from memoguard.score import (ScoreTrace, ScoreUnavailable, eps_difference, l2_per_image, rms_per_image, to_eps,
                             uncond_is_missing)

torch.manual_seed(0)


def _vp(abar):
    return math.sqrt(abar), math.sqrt(1 - abar)


@pytest.mark.parametrize("abar", [0.9, 0.3, 0.005])
def test_vp_predictions_recover_eps(abar):
    a, s = _vp(abar)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    x = a * x0 + s * eps
    v = a * eps - s * x0
    for kind, pred in (("eps", eps), ("v", v), ("x0", x0)):
        torch.testing.assert_close(to_eps(pred, kind, x, a, s), eps, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sigma", [1.0, 0.5, 0.1])
def test_a_flow_is_read_as_x0_plus_sigma_velocity(sigma):
    """x = (1 - sigma) x0 + sigma eps = x0 + sigma v: with (alpha, sigma) = (1, sigma) the velocity stands where eps
    stands, ComfyUI's denoised x0 converts to it, and DDIM's step is the flow's Euler step."""
    x0, eps = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    x = sigma * eps + (1 - sigma) * x0
    velocity = eps - x0
    torch.testing.assert_close(to_eps(velocity, "flow", x, 1.0, sigma), velocity)
    torch.testing.assert_close(to_eps(x0, "x0", x, 1.0, sigma), velocity, rtol=1e-4, atol=1e-4)
    euler = x + (0.25 * sigma - sigma) * velocity
    torch.testing.assert_close(ddim_step(x, velocity, (1.0, sigma), (1.0, 0.25 * sigma)), euler, rtol=1e-5, atol=1e-5)


def test_a_flow_scores_at_sigma_one_where_its_noise_difference_vanishes():
    x = torch.randn(2, 16, 4, 4)
    v_c, v_u = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    d_c, d_u = x - v_c, x - v_u  # ComfyUI's denoised at sigma 1
    gap = rms_per_image(eps_difference(d_c, d_u, "x0", 1.0, 1.0))
    torch.testing.assert_close(gap, rms_per_image(v_c - v_u))
    assert float(gap.min()) > 0.5  # (1 - sigma)(v_c - v_u), the noise difference, is 0 here


def test_kdiffusion_denoised_recovers_eps():
    sigma = 14.6  # x = x0 + sigma * eps, ComfyUI / A1111 k-diffusion
    x0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(to_eps(x0, "x0", x0 + sigma * eps, 1.0, sigma), eps, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["eps", "v", "x0", "flow"])
def test_difference_is_the_difference_of_conversions(kind):
    a, s = (0.6, 0.8) if kind != "flow" else (1.0, 0.7)
    x, pc, pu = torch.randn(3, 2, 4, 4, 4).unbind(0)
    expected = to_eps(pc, kind, x, a, s) - to_eps(pu, kind, x, a, s)
    torch.testing.assert_close(eps_difference(pc, pu, kind, a, s), expected, rtol=1e-5, atol=1e-5)


def test_hand_computed_cases():
    c, u = torch.full((1, 1, 2, 2), 3.0), torch.full((1, 1, 2, 2), 1.0)
    # eps: difference 2 in 4 elements -> L2 4, RMS 2
    assert l2_per_image(eps_difference(c, u, "eps")).item() == pytest.approx(4.0)
    assert rms_per_image(eps_difference(c, u, "eps")).item() == pytest.approx(2.0)
    assert eps_difference(c, u, "v", alpha=0.5)[0, 0, 0, 0].item() == pytest.approx(1.0)
    # x0 in k-diffusion: (D_u - D_c) / sigma = (1 - 3) / 4
    assert eps_difference(c, u, "x0", 1.0, 4.0)[0, 0, 0, 0].item() == pytest.approx(-0.5)
    # flow denoised, read as x = x0 + sigma v: (D_u - D_c) / sigma with sigma = 0.5
    assert eps_difference(c, u, "x0", 1.0, 0.5)[0, 0, 0, 0].item() == pytest.approx(-4.0)
    assert eps_difference(c, u, "flow", 1.0)[0, 0, 0, 0].item() == pytest.approx(2.0)


def test_per_image_coefficients_broadcast():
    c, u = torch.ones(2, 3, 2, 2), torch.zeros(2, 3, 2, 2)
    d = eps_difference(c, u, "x0", torch.tensor([1.0, 1.0]), torch.tensor([1.0, 2.0]))
    assert d[0].unique().item() == pytest.approx(-1.0) and d[1].unique().item() == pytest.approx(-0.5)


def test_rms_does_not_grow_with_resolution():
    small, big = torch.randn(1, 4, 64, 64), torch.randn(1, 4, 128, 128)
    assert l2_per_image(big) / l2_per_image(small) == pytest.approx(2.0, rel=0.05)
    assert rms_per_image(big) / rms_per_image(small) == pytest.approx(1.0, rel=0.05)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown parameterization 'epsilon'"):
        eps_difference(torch.ones(1, 1), torch.ones(1, 1), "epsilon")
    with pytest.raises(ValueError, match="differ in shape"):
        eps_difference(torch.ones(2, 4), torch.ones(1, 4), "eps")
    with pytest.raises(ValueError, match="needs sigma"):
        eps_difference(torch.ones(1, 4), torch.ones(1, 4), "x0")


def test_uncond_missing_detects_none_and_cfg1_zeros():
    assert uncond_is_missing(None)
    assert uncond_is_missing(torch.zeros(2, 4, 8, 8))
    assert not uncond_is_missing(torch.randn(2, 4, 8, 8))


def test_trace_keeps_first_call_of_each_step_and_averages_windows():
    trace = ScoreTrace(detector="magnitude")
    trace.record(0, torch.full((2, 1, 2, 2), 1.0))
    trace.record(0, torch.full((2, 1, 2, 2), 9.0))  # a second-order sampler's extra call
    trace.record(1, torch.full((2, 1, 2, 2), 3.0))
    assert trace.per_step().shape == (2, 2)
    assert trace.score().tolist() == [1.0, 1.0]
    assert trace.score(window=2).tolist() == [2.0, 2.0]
    assert trace.raw_score().tolist() == [2.0, 2.0]  # RMS 1 over 4 elements -> L2 2


def test_trace_scores_steps_by_number_not_by_recording_order():
    trace = ScoreTrace(detector="magnitude")  # step 0 was never recorded (e.g. a hook that failed on it)
    trace.record(1, torch.full((1, 1, 2, 2), 3.0))
    trace.record(2, torch.full((1, 1, 2, 2), 5.0))
    with pytest.raises(ScoreUnavailable, match="steps 0 to 0 were not recorded"):
        trace.score()
    assert trace.score(window=2).tolist() == [3.0]
    assert trace.score(window=2, start=1).tolist() == [4.0]


def test_trace_nan_and_unavailable():
    trace = ScoreTrace(detector="magnitude")
    diff = torch.ones(2, 1, 2, 2)
    diff[1, 0, 0, 0] = float("nan")
    trace.record(0, diff)
    s = trace.score()
    assert s[0].item() == 1.0 and math.isnan(s[1].item())
    trace.mark_unavailable("cfg = 1: no unconditional prediction")
    with pytest.raises(ScoreUnavailable, match="cfg = 1"):
        trace.score()
    with pytest.raises(ScoreUnavailable, match="no sampling step"):
        ScoreTrace().score()


def test_detector_scores():
    from memoguard.score import detector_score
    torch.manual_seed(0)
    eps_u = torch.randn(2, 4, 8, 8)
    diff = torch.stack([eps_u[0], -eps_u[1]]) * 0.1  # along the uncond prediction / against it
    eps_c = eps_u + diff
    magnitude = detector_score(eps_c, eps_u, "magnitude")
    assert torch.allclose(magnitude, diff.flatten(1).norm(dim=1) / 16)
    combined = detector_score(eps_c, eps_u, "magnitude_alignment")
    assert torch.allclose(combined, magnitude * torch.tensor([math.e, 1 / math.e]), rtol=1e-5)
    with pytest.raises(ValueError, match="detector must be one of"):
        detector_score(eps_c, eps_u, "vibes")


def test_anisotropy_score_is_the_papers_norm_plus_weighted_cosine():
    """Asthana & Belagiannis: weights[0] x ||eps_c - eps_u|| at the first step + weights[1] x the cosine between
    eps_u and eps_c - eps_u at the low noise level, along the channels of each position, averaged over positions."""
    from memoguard.score import ANISOTROPY_WEIGHTS, anisotropy_score
    torch.manual_seed(0)
    diff_first = torch.randn(2, 4, 8, 8) * 0.1
    eps_u_low = torch.randn(2, 4, 8, 8)
    diff_low = torch.stack([eps_u_low[0] * 0.3, -eps_u_low[1] * 0.3])  # aligned / opposed at every position
    got = anisotropy_score(diff_first, eps_u_low, diff_low)
    w_norm, w_cos = ANISOTROPY_WEIGHTS
    expected = w_norm * diff_first.flatten(1).norm(dim=1) + w_cos * torch.tensor([1.0, -1.0])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the cosine is per position, then averaged: half the positions aligned, half opposed gives 0
    half = diff_low.clone()
    half[0, :, :4] *= -1
    assert anisotropy_score(torch.zeros(2, 4, 8, 8), eps_u_low, half, weights=(1.0, 1.0))[0].abs() < 1e-6


def test_anisotropy_first_step_scores_match_direct_evaluation(tiny_model):
    """FirstStep's shared unconditional halves give the score of the two CFG pairs evaluated directly: at t_first on
    x_T, and at the third-to-last of 50 steps on the same unit noise."""
    from memoguard.measure import FirstStep, first_step_gaps
    from memoguard.sampling import initial_noise
    from memoguard.score import anisotropy_score
    model = tiny_model
    prompts = ["a purple ring, lighthouse poster", "a red circle", "a small blue ring"]
    t_first, t_low = model.timesteps(50)[0], model.timesteps(50)[-3]
    got = first_step_gaps(model, prompts, [0, 1], model.latent_shape(), t_first, detector="anisotropy")
    x = initial_noise(model, model.latent_shape(), [0, 1])
    uncond = model.encode([""])
    for p, prompt in enumerate(prompts):
        cond = model.encode([prompt]).repeat_rows(2)
        c, u = model.eps_pair(x, t_first, cond, uncond)
        c_low, u_low = model.eps_pair(x, t_low, cond, uncond)  # a VP schedule shows the network x_T unscaled
        direct = anisotropy_score(c - u, u_low, c_low - u_low)
        np.testing.assert_allclose(got[p], direct.numpy(), rtol=1e-4, atol=1e-5)
    batched = first_step_gaps(model, prompts, [0, 1], model.latent_shape(), t_first, batch_size=2, detector="anisotropy")
    np.testing.assert_allclose(batched, got, rtol=1e-4, atol=1e-5)
    assert FirstStep(model, uncond, [0], model.latent_shape(), t_first, "anisotropy").t_low == t_low


def test_detail_score_ignores_what_is_flat_over_3x3_and_keeps_single_pixel_detail():
    from memoguard.score import DEFAULT_DETECTOR, step_score
    assert DEFAULT_DETECTOR == "detail_magnitude"
    flat = torch.full((1, 4, 8, 8), 2.0)  # a caption's colour: the whole latent pulled one way
    assert step_score(flat, "magnitude").item() == pytest.approx(2.0)
    assert step_score(flat).item() == pytest.approx(0.0, abs=1e-6)
    spike = torch.zeros(1, 1, 8, 8)
    spike[0, 0, 4, 4] = 9.0  # one latent pixel: its 3x3 mean is 1, so it keeps 8 and its 8 neighbours -1
    assert step_score(spike).item() == pytest.approx(math.sqrt((8 ** 2 + 8 * 1) / 64), rel=1e-6)
    video = torch.randn(2, 4, 3, 8, 8)  # (B, C, frames, H, W): each frame alone
    frames = torch.stack([step_score(video[:, :, f]) for f in range(3)], 1)
    assert torch.allclose(step_score(video), (frames ** 2).mean(1).sqrt(), rtol=1e-5)


def test_trace_records_its_detector_and_a_calibration_of_another_detector_judges_nothing():
    from memoguard.calibration import Calibration
    from memoguard.verdict import verdict_for
    diff = torch.randn(2, 4, 8, 8)
    detail, magnitude = ScoreTrace(), ScoreTrace(detector="magnitude")
    detail.record(0, diff)
    magnitude.record(0, diff)
    assert detail.to_dict()["detector"] == "detail_magnitude" and detail.score()[0] < magnitude.score()[0]
    with pytest.raises(ValueError, match="a step's score is one of"):
        ScoreTrace(detector="anisotropy")
    low = Calibration("k", [0.001 * i for i in range(1, 21)], conditions={"detector": "magnitude"})
    judged = verdict_for(magnitude, low, images=2)
    assert all(v.flagged and v.detector == "magnitude" for v in judged)
    refused = verdict_for(detail, low, images=2)
    assert all(v.label == "uncalibrated" and "holds magnitude scores" in v.reason for v in refused)
    assert Calibration("k", [0.1] * 10).detector == "magnitude"  # files from before detectors were recorded
