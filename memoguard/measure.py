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
from .score import ANISOTROPY_LOW_STEP, DEFAULT_DETECTOR, anisotropy_score, detector_score, explained_detector

Progress = Callable[[int, int], None]  # (evaluations done, evaluations in all)


@torch.no_grad()
def first_step_gaps(model: DiffusionModel, prompts: Sequence[str], seeds: Sequence[int], shape, t_first,
                    batch_size: int = 32, progress: Optional[Progress] = None,
                    detector: str = DEFAULT_DETECTOR, uncond: Optional[PromptEncoding] = None) -> np.ndarray:
    """(P, G) RMS gap (or another detector's score, memoguard.score.DETECTORS) at the first step (timestep /
    sigma `t_first`) of each prompt x seed. uncond: the empty prompt's encoding, when the caller has it already."""
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
    pair's up to float rounding, ~1e-6 relative). The anisotropy detector evaluates the same x_T a second time,
    presented at the low noise level of `t_low` (default: the third-to-last step of a 50-step schedule, as
    its paper): two conditional evaluations per prompt and seed."""

    def __init__(self, model: DiffusionModel, uncond: PromptEncoding, seeds: Sequence[int], shape, t_first,
                 detector: str = DEFAULT_DETECTOR, t_low=None):
        self.model, self.uncond, self.t, self.detector = model, uncond, t_first, detector
        self.x = initial_noise(model, shape, list(seeds), _device(uncond))
        self._eps_u = {}  # (prompt length, t) -> (G, ...) eps under the empty prompt
        if detector == "anisotropy":
            self.t_low = model.timesteps(50)[ANISOTROPY_LOW_STEP] if t_low is None else t_low
            self.x_low = self.x * _input_scale(model, self.t_low) / _input_scale(model, t_first)

    def _eps(self, x, t, cond: PromptEncoding, gens: int):
        """(eps under each prompt of `cond` at x, eps under the empty prompt), prompt-major with seeds inner."""
        batch, length = cond.embedding.shape[0], cond.embedding.shape[1]
        key = (length, float(t))
        if key not in self._eps_u:
            self._eps_u[key] = self.model.eps_uncond(x, t, self.uncond, length)
        rows = cond.repeat_rows(gens)
        tile = (batch,) + (1,) * (x.dim() - 1)  # images or video latents (B, C, [T,] H, W)
        eps_c = self.model.eps(x.repeat(tile), t, rows.embedding, rows.extra)
        return eps_c, self._eps_u[key].repeat(tile)

    @torch.no_grad()
    def gaps(self, cond: PromptEncoding) -> np.ndarray:
        """(B, G) scores of the B prompts of `cond`."""
        batch, gens = cond.embedding.shape[0], self.x.shape[0]
        eps_c, eps_u = self._eps(self.x, self.t, cond, gens)
        if self.detector == "anisotropy":
            low_c, low_u = self._eps(self.x_low, self.t_low, cond, gens)
            score = anisotropy_score(eps_c - eps_u, low_u, low_c - low_u)
        else:
            score = detector_score(eps_c, eps_u, self.detector)
        return score.reshape(batch, gens).cpu().numpy()


@torch.no_grad()
def band_gaps(model: DiffusionModel, prompts: Sequence[str], seed: int, shape, steps: int, guidance: float,
              batch_size: int = 8, progress: Optional[Progress] = None,
              timesteps: Optional[torch.Tensor] = None, detector: str = DEFAULT_DETECTOR) -> np.ndarray:
    """(P, steps) score per step (by `detector`) of a guided run of each prompt (one seed each: seed, seed + 1,
    ...), on the model's `steps`-step schedule or on explicit `timesteps`."""
    uncond = model.encode([""])
    out = []

    def gaps(rows, cond):  # rows of the batch at `start`: prompt start + r has seed seed + start + r
        x = initial_noise(model, shape, [seed + start + r for r in rows], _device(cond))
        return sample(model, cond, uncond, x, steps, guidance, timesteps=timesteps, detector=detector,
                      cfg1_scored_steps=None).trace.per_step().T.numpy()

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
              band_timesteps: Optional[torch.Tensor] = None, detector: str = DEFAULT_DETECTOR) -> Calibration:
    """A calibration of `model` from benign `prompts` at the first step of its `steps`-step schedule.

    band_prompts: how many of the prompts also get a full run for the band (0: no band); band_timesteps: the
    schedule of those runs (default: the model's `steps`-step one), e.g. one spanning the whole noise range
    so that the band serves schedulers that start higher or end lower. detector: what the verdict's scores are
    (memoguard.score.DETECTORS; recorded, and only runs scored the same way are judged against them); the band
    is the same detector's score per step (magnitude for the detectors a step cannot give).
    Each prompt x seed is one benign sample: a verdict judges one generation, and calibrated so the held-out rate
    of single generations holds the nominal one on both evaluation models (BENCHMARKS.md, calibration_fpr).
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
    scores = first_step_gaps(model, prompts, seeds, shape, t_first, batch_size, report("first step"),
                             detector).reshape(-1)
    other = {}
    for t in extra_timesteps:
        t = torch.as_tensor(t, device=t_first.device, dtype=t_first.dtype)
        level = model.noise_level(t)
        if level != model.noise_level(t_first):
            other[repr(level)] = first_step_gaps(model, prompts, seeds, shape, t, batch_size,
                                                 report(f"first step at t={float(t):g}"),
                                                 detector).reshape(-1).tolist()
    band = None
    if band_prompts:
        chosen = list(prompts[:band_prompts])
        schedule = model.timesteps(steps) if band_timesteps is None else band_timesteps
        gaps = band_gaps(model, chosen, 1000, shape, len(schedule), guidance, max(1, batch_size // 4),
                         report("band"), schedule, explained_detector(detector))
        # deterministic DDIM, which in sigma form is the host's Euler: named as the host names its sampler
        sampler = (conditions or {}).get("sampler") or "ddim"
        band = Band.from_runs([model.noise_level(t) for t in schedule], gaps, band_fpr,
                              {"steps": len(schedule), "guidance": guidance, "sampler": sampler, "prompts": len(chosen)})
    cond = {**(conditions or {}), "noise_level": model.noise_level(t_first), "latent": list(shape), "detector": detector,
            "prediction": (conditions or {}).get("prediction") or model.prediction or model.parameterization}
    if model.embedded_guidance is not None and "embedded_guidance" not in cond:
        cond["embedded_guidance"] = model.embedded_guidance
    return Calibration(model_key, scores.tolist(), 1, guidance,
                       {"prompts": len(prompts), "seeds": len(seeds), "steps": steps}, cond, band, other)


def _input_scale(model: DiffusionModel, t) -> float:
    """sqrt(alpha^2 + sigma^2) at t: x_t divided by it is what the network sees (1 on a VP schedule; the
    k-diffusion input scaling 1 / sqrt(sigma^2 + 1) otherwise), so x_T times scale(t_low) / scale(t_first) shows
    the network the same unit noise at t_low."""
    alpha, sigma = model.coefficients(torch.as_tensor(t).reshape(1))
    return float(torch.sqrt(torch.as_tensor(alpha, dtype=torch.float64) ** 2 +
                            torch.as_tensor(sigma, dtype=torch.float64) ** 2).reshape(-1)[0])


def _device(enc: PromptEncoding):
    return enc.embedding.device
