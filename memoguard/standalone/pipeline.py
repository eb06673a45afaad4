"""Batched standalone jobs on a DiffusionModel: first-step scores, and guided generation.

Prompts x seeds are laid out prompt-major; each image's noise comes from its own seed and each prompt is
encoded at its own length, so a prompt's images do not depend on the batch it was sampled in.
"""
from typing import Optional, Sequence

import numpy as np

from ..measure import first_step_gaps
from ..model import DiffusionModel
from ..sampling import initial_noise, sample

DEFAULT_STEPS = 50     # the paper's DDIM schedule; the first step is its first timestep


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def first_step_scores(model: DiffusionModel, prompts: Sequence[str], seeds: Sequence[int],
                      steps: int = DEFAULT_STEPS, batch_size: int = 128, uncond=None) -> np.ndarray:
    """(P, G) RMS gap at the first step of a `steps` schedule: one conditional UNet evaluation per image, and one
    unconditional per seed shared by all prompts."""
    return first_step_gaps(model, prompts, seeds, model.latent_shape(), model.timesteps(steps)[0], batch_size,
                           uncond=uncond)


def generate(model: DiffusionModel, prompts: Sequence[str], seeds: Sequence[int], steps: int = DEFAULT_STEPS,
             guidance: Optional[float] = None, batch_size: int = 128):
    """Images (P, G, H, W, 3) in [0, 1] and per-step RMS gaps (P, G, steps)."""
    uncond = model.encode([""])
    gens = len(seeds)

    def run(rows, cond):
        x = initial_noise(model, model.latent_shape(), list(seeds) * len(rows), model.device)
        result = sample(model, cond.repeat_rows(gens), uncond, x, steps, guidance)
        pixels, per_step = model.decode(result.latents).numpy(), result.trace.per_step().T.numpy()
        return [(pixels[k * gens:(k + 1) * gens], per_step[k * gens:(k + 1) * gens]) for k in range(len(rows))]

    done = []
    for sl in _batches(len(prompts), max(1, batch_size // gens)):
        done += model.per_prompt(prompts[sl], run)
    return np.stack([images for images, _ in done]), np.stack([gaps for _, gaps in done])
