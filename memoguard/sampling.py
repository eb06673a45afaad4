"""Classifier-free-guided DDIM sampling on a `DiffusionModel`, with the score recorded for free.

The standalone path (CLI, benchmarks) samples with this; host adapters use their hosts' own
samplers and only call the score functions.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .model import DiffusionModel, PromptEncoding, ddim_step
from .score import DEFAULT_DETECTOR, ScoreTrace

CLEAN = (1.0, 0.0)  # (alpha, sigma) of the finished image in every convention
StepCallback = Callable[[int, int, torch.Tensor], None]  # (step, total, rms gaps (B,) on device)


@dataclass
class SampleResult:
    latents: torch.Tensor
    trace: Optional[ScoreTrace]


def initial_noise(model: DiffusionModel, shape, seeds, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """x_T for each image, one CPU generator per seed so that batch size does not change images."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return model.initial_x(torch.stack(noise).to(device, dtype))


@torch.no_grad()
def sample(model: DiffusionModel, cond: PromptEncoding, uncond: PromptEncoding, x_T: torch.Tensor,
           steps: int = 20, guidance=None, monitor: bool = True,
           cond_embedding: Optional[torch.Tensor] = None, on_step: Optional[StepCallback] = None,
           timesteps: Optional[torch.Tensor] = None, detector: str = DEFAULT_DETECTOR,
           cfg1_scored_steps: Optional[int] = 1) -> SampleResult:
    """DDIM with CFG. With monitor=True each step's score (by `detector`) goes into a ScoreTrace; nothing else
    changes.
    timesteps: an explicit schedule (noisiest first) instead of the model's `steps`-step one.
    guidance: a scale, or a (steps, B) tensor of scales per step and image (memoguard.mitigate).
    cfg1_scored_steps: at guidance 1 (a guidance-distilled model: Flux, the Turbo / Lightning kinds) a step needs
    only the prompt's prediction; the unconditional one is run for the score at the first this many steps (the
    verdict's), one extra model call each; None: at every step (a band along the run)."""
    ts = model.timesteps(steps) if timesteps is None else timesteps
    guidance = model.guidance if guidance is None else guidance
    if isinstance(guidance, torch.Tensor) and tuple(guidance.shape) != (len(ts), x_T.shape[0]):
        raise ValueError(f"a guidance schedule must be (steps, images) = ({len(ts)}, {x_T.shape[0]}), "
                         f"got {tuple(guidance.shape)}")
    unguided = not isinstance(guidance, torch.Tensor) and float(guidance) == 1.0
    cond_emb = cond.embedding if cond_embedding is None else cond_embedding
    x = x_T
    trace = ScoreTrace(detector=detector) if monitor else None
    for i, t in enumerate(ts):
        scored = trace is not None and not (unguided and cfg1_scored_steps is not None and i >= cfg1_scored_steps)
        if unguided:  # the prompt's prediction alone, as in an unmonitored run; the empty prompt's apart, for the score
            eps = eps_c = model.eps(x, t, cond_emb, cond.extra)
            eps_u = model.eps_uncond(x, t, uncond, cond_emb.shape[1]) if scored else None
        else:
            eps_c, eps_u = model.eps_pair(x, t, cond, uncond, cond_embedding)
            scale = (guidance[i].to(x).reshape(-1, *([1] * (x.dim() - 1))) if isinstance(guidance, torch.Tensor)
                     else guidance)
            eps = model.guided(eps_c, eps_u, scale)
        if scored:
            gaps = trace.record(i, eps_c - eps_u, float(t))
            if on_step is not None:
                on_step(i, len(ts), gaps)
        coeff_next = model.coefficients(ts[i + 1]) if i + 1 < len(ts) else CLEAN
        x = ddim_step(x, eps, model.coefficients(t), coeff_next)
    return SampleResult(x, trace)
