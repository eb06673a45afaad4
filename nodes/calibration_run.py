"""Calibrating the loaded model inside ComfyUI: the sampler's own model call, schedule and latent size.

Host glue only (duck-typed, so CI runs it against tests/comfyui/harness.py); the numbers come from
memoguard.measure.calibrate: one conditional model evaluation per benign prompt at the schedule's first sigma
(the unconditional one is the same for every prompt: evaluated once) for the verdict, and a full guided run per
band prompt for the benign band (DDIM in sigma form = Euler; 2 x steps evaluations each). The result is saved under the
weights fingerprint of the model as loaded (LoRA patches baked in), where the Monitor's 'auto' looks.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from memoguard.calibration import CALIBRATION_SEEDS, Calibration, CalibrationError, CalibrationStore, default_benign_prompts
from memoguard.measure import calibrate

from .calibration_choice import model_key, prediction_of
from .comfy_model import ComfyDiffusionModel

FPR = 0.01


@dataclass
class CalibrationResult:
    calibration: Calibration
    path: Path
    summary: str


def prompt_list(text: str) -> list:
    """One prompt per line; blank lines and '#' comments skipped; empty text = the shipped benign list."""
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip() and not line.strip().startswith("#")]
    return prompts or default_benign_prompts()


def calibrate_loaded(patcher, clip, latent_shape: Sequence[int], sigmas: torch.Tensor, prompts: Sequence[str],
                     folder, *, cfg: float, band_prompts: int, seed: int, batch_size: int, scheduler: str,
                     progress: Optional[Callable[[str, int, int], None]] = None) -> CalibrationResult:
    """Calibrate `patcher.model` (already loaded) at `sigmas` for latents of `latent_shape` (C, H, W)."""
    base = patcher.model
    if len(prompts) < 10:
        raise CalibrationError(f"a calibration needs at least 10 benign prompts, got {len(prompts)}")
    device = getattr(patcher, "load_device", None) or next(base.parameters()).device
    sigmas = sigmas.to(device)
    steps = len(sigmas) - 1
    noise = torch.zeros(1, *latent_shape, device=device)
    model = ComfyDiffusionModel(base, sigmas, clip, noise, device=device, words=False)  # any text encoder
    model.guidance = float(cfg)
    key = model_key(base)
    cal = calibrate(model, list(prompts), model_key=key, shape=tuple(latent_shape), steps=steps,
                    seeds=range(seed, seed + CALIBRATION_SEEDS),
                    guidance=float(cfg), band_prompts=min(int(band_prompts), len(prompts)),
                    batch_size=int(batch_size), progress=progress,
                    conditions={"host": "comfyui", "prediction": prediction_of(base), "scheduler": scheduler,
                                "steps": steps})
    embedded = model.encode(list(prompts[:1])).extra.get("guidance")  # Flux dev: the guidance it was encoded at
    if embedded is not None:
        cal.conditions["embedded_guidance"] = float(embedded.reshape(-1)[0])
    cal.meta.update(prompts=len(prompts), band_prompts=min(int(band_prompts), len(prompts)), seed=seed)
    path = CalibrationStore(folder).save(cal)
    flux = (f"; embedded guidance {cal.conditions['embedded_guidance']:g}"
            if "embedded_guidance" in cal.conditions else "")
    band = (f"; benign band over {cal.band.settings.get('prompts')} prompts at cfg {cfg:g}"
            if cal.band is not None else "; no band (band_prompts 0)")
    summary = (f"calibrated {key}: {len(prompts)} benign prompts x {CALIBRATION_SEEDS} seeds, {steps} steps ({scheduler}), first sigma "
               f"{float(sigmas[0]):.4g}, latent {'x'.join(map(str, latent_shape))}; threshold at 1% FPR "
               f"{cal.threshold(FPR):.4f} (median {cal.median:.4f}){band}{flux}; saved to {path}")
    return CalibrationResult(cal, path, summary)
