"""Calibrating a model: benign first-step scores for the verdict, and a benign band along a run.

Works on any `DiffusionModel` that can encode prompts and give a schedule, so ComfyUI, the WebUI
and the CLI all calibrate through their own model call. Cost:
  - verdict: one UNet evaluation per prompt and noise level (the conditional one), plus one shared
             unconditional evaluation per seed and prompt length (FirstStep);
  - band:    2 x steps evaluations per band prompt (a full guided DDIM run, = Euler in sigma form).
"""
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .calibration import Band, Calibration, CalibrationError
from .model import DiffusionModel, PromptEncoding
from .sampling import initial_noise, sample
from .score import detector_score

Progress = Callable[[int, int], None]  # (evaluations done, evaluations in all)


@torch.no_grad()
def first_step_gaps(model: DiffusionModel, prompts: Sequence[str], seeds: Sequence[int], shape, t_first,
                    batch_size: int = 32, progress: Optional[Progress] = None,
                    detector: str = "magnitude", uncond: Optional[PromptEncoding] = None) -> np.ndarray:
    """(P, G) RMS gap (or another `score.detector_score`) at the first step (timestep / sigma `t_first`) of
    each prompt x seed. uncond: the empty prompt's encoding, when the caller has it already."""
    first = FirstStep(model, model.encode([""]) if uncond is None else uncond, seeds, shape, t_first, detector)
    out = np.zeros((len(prompts), len(seeds)))
    per = max(1, batch_size // len(seeds))
    for start in range(0, len(prompts), per):
        stop = min(len(prompts), start + per)
        out[start:stop] = model.per_prompt(prompts[start:stop], lambda rows, cond: first.gaps(cond))
        if progress is not None:
            progress(stop, len(prompts))
    return out


class FirstStep:
    """First-step scores of prompts x seeds. Every prompt starts from its seed's x_T, so the unconditional half
    of each CFG pair, eps(x_T, ""), is the same for all prompts: it is evaluated once per seed and prompt
    length, and each prompt costs one conditional evaluation per seed instead of a pair (the scores equal the
    pair's up to float rounding, ~1e-6 relative)."""

    def __init__(self, model: DiffusionModel, uncond: PromptEncoding, seeds: Sequence[int], shape, t_first,
                 detector: str = "magnitude"):
        self.model, self.uncond, self.t, self.detector = model, uncond, t_first, detector
        self.x = initial_noise(model, shape, list(seeds), _device(uncond))
        self._eps_u = {}  # prompt length -> (G, ...) eps under the empty prompt

    @torch.no_grad()
    def gaps(self, cond: PromptEncoding) -> np.ndarray:
        """(B, G) scores of the B prompts of `cond`."""
        batch, gens, length = cond.embedding.shape[0], self.x.shape[0], cond.embedding.shape[1]
        if length not in self._eps_u:
            self._eps_u[length] = self.model.eps_uncond(self.x, self.t, self.uncond, length)
        rows = cond.repeat_rows(gens)
        x = self.x.repeat(batch, 1, 1, 1)  # prompt-major, seeds inner: as repeat_rows lays the prompts out
        eps_c = self.model.eps(x, self.t, rows.embedding, rows.extra)
        eps_u = self._eps_u[length].repeat(batch, 1, 1, 1)
        return detector_score(eps_c, eps_u, self.detector).reshape(batch, gens).cpu().numpy()


@torch.no_grad()
def band_gaps(model: DiffusionModel, prompts: Sequence[str], seed: int, shape, steps: int, guidance: float,
              batch_size: int = 8, progress: Optional[Progress] = None,
              timesteps: Optional[torch.Tensor] = None) -> np.ndarray:
    """(P, steps) RMS gap per step of a guided run of each prompt (one seed each: seed, seed + 1, ...), on the
    model's `steps`-step schedule or on explicit `timesteps`."""
    uncond = model.encode([""])
    out = []

    def gaps(rows, cond):  # rows of the batch at `start`: prompt start + r has seed seed + start + r
        x = initial_noise(model, shape, [seed + start + r for r in rows], _device(cond))
        return sample(model, cond, uncond, x, steps, guidance, timesteps=timesteps).trace.per_step().T.numpy()

    for start in range(0, len(prompts), batch_size):
        stop = min(len(prompts), start + batch_size)
        out += model.per_prompt(prompts[start:stop], gaps)
        if progress is not None:
            progress(stop, len(prompts))
    return np.stack(out)


def calibrate(model: DiffusionModel, prompts: Sequence[str], *, model_key: str, shape, steps: int,
              seeds: Sequence[int] = (0,), guidance: Optional[float] = None, band_prompts: int = 32,
              band_fpr: float = 0.01, extra_timesteps: Sequence = (), batch_size: int = 32,
              conditions: Optional[dict] = None, progress: Optional[Callable[[str, int, int], None]] = None,
              band_timesteps: Optional[torch.Tensor] = None) -> Calibration:
    """A calibration of `model` from benign `prompts` at the first step of its `steps`-step schedule.

    band_prompts: how many of the prompts also get a full run for the band (0: no band); band_timesteps: the
    schedule of those runs (default: the model's `steps`-step one), e.g. one spanning the whole noise range
    so that the band serves schedulers that start higher or end lower.
    extra_timesteps: first steps at these timesteps (the model's own t convention) are scored as well
    (other_levels), for samplers and schedulers that start their runs at other noise levels. conditions: what the host adds (host, prediction, sampler ...).
    """
    if not prompts:
        raise CalibrationError("calibration needs benign prompts; got none")
    if band_prompts == 1 or band_prompts < 0:  # checked before any work: the band is made last
        raise CalibrationError(f"band runs must be 0 (no band) or at least 2 (a band needs the spread of several "
                               f"benign runs), got {band_prompts}")
    guidance = model.guidance if guidance is None else float(guidance)
    report = (lambda stage: (lambda done, total: progress(stage, done, total))) if progress else (lambda stage: None)
    t_first = model.timesteps(steps)[0]
    scores = first_step_gaps(model, prompts, seeds, shape, t_first, batch_size, report("first step")).mean(1)
    other = {}
    for t in extra_timesteps:
        t = torch.as_tensor(t, device=t_first.device, dtype=t_first.dtype)
        level = model.noise_level(t)
        if level != model.noise_level(t_first):
            other[repr(level)] = first_step_gaps(model, prompts, seeds, shape, t, batch_size,
                                                 report(f"first step at t={float(t):g}")).mean(1).tolist()
    band = None
    if band_prompts:
        chosen = list(prompts[:band_prompts])
        schedule = model.timesteps(steps) if band_timesteps is None else band_timesteps
        gaps = band_gaps(model, chosen, 1000, shape, len(schedule), guidance, max(1, batch_size // 4),
                         report("band"), schedule)
        # deterministic DDIM, which in sigma form is the host's Euler: named as the host names its sampler
        sampler = (conditions or {}).get("sampler") or "ddim"
        band = Band.from_runs([model.noise_level(t) for t in schedule], gaps, band_fpr,
                              {"steps": len(schedule), "guidance": guidance, "sampler": sampler, "prompts": len(chosen)})
    cond = {**(conditions or {}), "noise_level": model.noise_level(t_first), "latent": list(shape),
            "prediction": (conditions or {}).get("prediction") or model.prediction or model.parameterization}
    return Calibration(model_key, scores.tolist(), 1, guidance,
                       {"prompts": len(prompts), "seeds": len(seeds), "steps": steps}, cond, band, other)


def _device(enc: PromptEncoding):
    return enc.embedding.device
