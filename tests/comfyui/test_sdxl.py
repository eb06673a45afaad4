"""SDXL-style conditioning (y = pooled text + size ids), against the harness."""
import pytest
import torch

from memoguard import step_score, token_contributions
from memoguard.host_autograd import differentiable
from nodes.comfy_model import ComfyDiffusionModel
from nodes.mitigation_hook import MitigationSession, MitigationSettings, attach_mitigation
from nodes.monitor_hook import MonitorSession, MonitorSettings, attach_monitor
from . import harness

STEPS = 3
TEXT = "a purple ring, lighthouse poster"


@pytest.fixture(scope="module")
def sdxl():
    """A tiny SDXL-like model and CLIP whose weights are inference tensors, as ComfyUI loads them."""
    with torch.inference_mode():
        _, text_encoder = harness.tiny_unet()
        base = harness.SDXL(harness.tiny_sdxl_unet(pooled_channels=text_encoder.config.hidden_size))
    return base, harness.CLIP(text_encoder)


def monitored(base, **settings):
    session = MonitorSession(MonitorSettings(**settings), emit=lambda e, d: None, show=lambda t, n: None)
    return attach_monitor(harness.ModelPatcher(base), session), session


def test_token_contributions_build_y_as_the_sampler_does(sdxl):
    base, clip = sdxl
    torch.manual_seed(4)
    noise = torch.randn(1, 3, 16, 16)
    patched, monitor = monitored(base)
    with torch.inference_mode():
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(TEXT))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    harness.sample(patched, noise, positive, negative, steps=STEPS)
    sigmas = harness.schedule(base, STEPS)
    with torch.inference_mode(), differentiable(base):
        adapter = ComfyDiffusionModel(base, sigmas, clip, noise)
        cond, uncond = adapter.encode([TEXT]), adapter.encode([""], prompt_type="negative")
        assert cond.extra["y"].shape == (1, 64 + harness.SDXL.SIZE_CHANNELS)
        x_T = adapter.initial_x(noise.clone())
        eps_c, eps_u = adapter.eps_pair(x_T, sigmas[0], cond, uncond)
        result = token_contributions(adapter, cond, uncond, x_T, steps=2, total_steps=STEPS,
                                     method="gradient_norm")[0]
    # the adapter's first-step gap is the sampler's own: same y (pooled text and 128x128 size ids)
    assert step_score(eps_c - eps_u).tolist() == pytest.approx(monitor.trace.per_step()[0].tolist(), rel=1e-4)
    assert result.tokens == ["a", "purple", "ring", ",", "lighthouse", "poster"]
    assert sum(result.shares) == pytest.approx(1.0) and all(s > 0 for s in result.scores)


def test_mitigation_keeps_y_and_the_sampler_starts_from_the_minimized_score(sdxl):
    base, clip = sdxl
    torch.manual_seed(5)
    noise = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(TEXT))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    session = MitigationSession(MitigationSettings(mitigation="always", strategy="minimize", lr=0.1, max_iters=4),
                                emit=lambda e, d: None, show=lambda t, n: None)
    monitor = MonitorSession(MonitorSettings(), emit=lambda e, d: None, show=lambda t, n: None)
    patched = attach_monitor(attach_mitigation(harness.ModelPatcher(base), session), monitor)
    harness.sample(patched, noise, positive, negative, steps=STEPS)
    record = session.record
    assert session.error is None and record.ran and record.iterations == 4
    assert all(a < b for a, b in zip(record.after, record.before))
    assert monitor.trace.per_step()[0].tolist() == pytest.approx(record.after, rel=1e-3, abs=1e-6)
