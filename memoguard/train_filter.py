"""Training-time mitigation: leave memorization-prone samples out of the loss.

For every sample of a batch, the gap ||eps(x_t, c) - eps(x_t, empty)|| (RMS form, see score.py)
on that sample's own noisy latent and timestep; samples with gap >= tau are dropped. The
conditional prediction is the one the training step computes anyway, so the filter costs one
extra forward of the empty prompt, without gradients.

    filt = MemorizationFilter(tau=0.35)                      # or percentile=95, or calibration=...
    pred = unet(noisy, t, encoder_hidden_states=cond).sample
    with torch.no_grad():
        pred_u = unet(noisy, t, encoder_hidden_states=empty.expand_as(cond)).sample
    keep = filt.keep_mask(gaps_from_predictions(pred, pred_u))
    loss = filt.masked_loss(((pred - noise) ** 2).mean(dim=(1, 2, 3)), keep)
    if loss is not None:
        loss.backward(); opt.step()
"""
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch

from .calibration import Calibration
from .score import eps_difference, rms_per_image


def gaps_from_predictions(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, parameterization: str = "eps",
                          alpha=1.0, sigma=None) -> torch.Tensor:
    """Per-sample RMS gap from the training step's own cond prediction and an uncond one (no grad)."""
    with torch.no_grad():
        return rms_per_image(eps_difference(pred_cond.detach(), pred_uncond.detach(), parameterization, alpha, sigma))


@dataclass
class FilterStats:
    steps: int = 0
    skipped_steps: int = 0
    samples: int = 0
    dropped: int = 0
    last: dict = field(default_factory=dict)

    @property
    def drop_rate(self) -> float:
        return self.dropped / self.samples if self.samples else 0.0


class MemorizationFilter:
    """Keeps samples whose gap is under tau; tau is fixed, from a calibration, or a running percentile.

    percentile mode: tau is the given percentile of the last `history` gaps; nothing is dropped
    during the first `warmup_steps` calls, while the history fills.
    """

    def __init__(self, tau: Optional[float] = None, *, percentile: Optional[float] = None,
                 calibration: Optional[Calibration] = None, fpr: float = 0.01,
                 warmup_steps: int = 50, history: int = 4096):
        given = [tau is not None, percentile is not None, calibration is not None]
        if sum(given) != 1:
            raise ValueError("give exactly one of tau, percentile or calibration")
        if tau is not None and not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
        if percentile is not None and not 0 < percentile < 100:
            raise ValueError(f"percentile must be in (0, 100), got {percentile!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.fixed_tau = calibration.threshold(fpr) if calibration is not None else tau
        self.percentile, self.warmup_steps = percentile, warmup_steps
        self.history = deque(maxlen=history)
        self.stats = FilterStats()

    @property
    def tau(self) -> Optional[float]:
        """Current threshold; None while a percentile filter is still warming up."""
        if self.fixed_tau is not None:
            return self.fixed_tau
        if self.stats.steps < self.warmup_steps or not self.history:
            return None
        return float(torch.tensor(list(self.history)).quantile(self.percentile / 100))

    def keep_mask(self, gaps: torch.Tensor) -> torch.Tensor:
        """Bool (B,) keep-mask for one batch; updates the statistics. Non-finite gaps are dropped."""
        gaps = gaps.detach().float().reshape(-1)
        tau = self.tau
        finite = torch.isfinite(gaps)
        keep = finite if tau is None else finite & (gaps < tau)
        self.history.extend(gaps[finite].cpu().tolist())
        s = self.stats
        s.steps += 1
        s.samples += gaps.numel()
        s.dropped += int((~keep).sum())
        s.skipped_steps += int(gaps.numel() > 0 and not bool(keep.any()))
        s.last = {"kept": int(keep.sum()), "dropped": int((~keep).sum()), "tau": tau,
                  "gap_mean": float(gaps[finite].mean()) if finite.any() else float("nan"),
                  "gap_max": float(gaps[finite].max()) if finite.any() else float("nan")}
        return keep.to(gaps.device)

    @staticmethod
    def masked_loss(per_sample_loss: torch.Tensor, keep: torch.Tensor) -> Optional[torch.Tensor]:
        """Mean loss over kept samples (exactly the loss of the kept subset); None when none is kept."""
        if per_sample_loss.dim() != 1 or per_sample_loss.shape != keep.shape:
            raise ValueError(f"need a per-sample loss (B,) and a keep-mask (B,), got "
                             f"{tuple(per_sample_loss.shape)} and {tuple(keep.shape)}")
        if not bool(keep.any()):
            return None
        return per_sample_loss[keep].mean()
