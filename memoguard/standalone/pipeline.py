"""Batched standalone jobs on a DiffusionModel: first-step scores, and guided generation.

Prompts x seeds are laid out prompt-major; each image's noise comes from its own seed, so a
prompt's images do not depend on the batch it was sampled in.
"""
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..measure import first_step_gaps
from ..model import DiffusionModel
from ..sampling import initial_noise, sample

DEFAULT_STEPS = 50     # the paper's DDIM schedule; the first step is its first timestep


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def first_step_scores(model: DiffusionModel, prompts: Sequence[str], seeds: Sequence[int],
                      steps: int = DEFAULT_STEPS, batch_size: int = 128, uncond=None) -> np.ndarray:
    """(P, G) RMS gap at the first step of a `steps` schedule: two UNet evaluations per image."""
    return first_step_gaps(model, prompts, seeds, model.latent_shape(), model.timesteps(steps)[0], batch_size,
                           uncond=uncond)


def generate(model: DiffusionModel, prompts: Sequence[str], seeds: Sequence[int], steps: int = DEFAULT_STEPS,
             guidance: Optional[float] = None, batch_size: int = 128,
             embeddings: Optional[torch.Tensor] = None,
             on_step: Optional[Callable[[int, int, torch.Tensor], None]] = None):
    """Images (P, G, H, W, 3) in [0, 1] and per-step RMS gaps (P, G, steps).

    embeddings: optional (P, L, C) conditional embeddings to sample with instead of encoding the
    prompts (e.g. mitigated ones).
    """
    uncond = model.encode([""])
    gens = len(seeds)
    images, gaps = [], []
    per = max(1, batch_size // gens)
    for sl in _batches(len(prompts), per):
        cond = model.encode(list(prompts[sl])).repeat_rows(gens)
        emb = None if embeddings is None else embeddings[sl].repeat_interleave(gens, dim=0)
        x = initial_noise(model, model.latent_shape(), list(seeds) * (sl.stop - sl.start), model.device)
        result = sample(model, cond, uncond, x, steps, guidance, cond_embedding=emb, on_step=on_step)
        images.append(model.decode(result.latents).numpy())
        gaps.append(result.trace.per_step().T.numpy())
    h, w = images[0].shape[1:3]
    return (np.concatenate(images).reshape(len(prompts), gens, h, w, 3),
            np.concatenate(gaps).reshape(len(prompts), gens, -1))

