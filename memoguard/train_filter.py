"""Training-time mitigation: leave memorization-prone samples out of the loss (Wen et al. 2024).

For every sample of a batch, the gap ||eps(x_t, c) - eps(x_t, empty)|| (RMS form, see score.py)
on that sample's own noisy latent and timestep; samples with gap >= tau are dropped. The
conditional prediction is the one the training step computes anyway, so the filter costs one
extra forward of the empty prompt, without gradients.

    filt = MemorizationFilter(tau=0.35)                      # or percentile=95, or calibration=...
    pred = unet(noisy, t, encoder_hidden_states=cond).sample
    with torch.no_grad():
        pred_u = unet(noisy, t, encoder_hidden_states=empty.expand_as(cond)).sample
    keep = filt.keep_mask(gaps_from_predictions(pred, pred_u))
    loss = filt.masked_loss(F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3)), keep)
    if loss is not None:                                     # None: every sample was dropped
        loss.backward(); opt.step()
    opt.zero_grad(); log(filt.last.to_dict())

Gradient accumulation: take reduction="sum" per micro-batch and divide the gradients by the
number of samples kept in the whole window before the optimizer step; that is exactly the mean
loss over the kept samples of the accumulated batch (see notes/train_filter.md).
"""
import math
import numbers
from collections import deque
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from .calibration import Calibration
from .score import eps_difference, rms_per_image


def gaps_from_predictions(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, parameterization: str = "eps",
                          alpha=1.0, sigma=None) -> torch.Tensor:
    """Per-sample RMS gap (B,) float32 from the step's own cond prediction and an uncond one."""
    with torch.no_grad():  # float32 first: under autocast the predictions may be fp16/bf16
        return rms_per_image(eps_difference(pred_cond.detach().float(), pred_uncond.detach().float(),
                                            parameterization, alpha, sigma))


@dataclass
class StepLog:
    """What the filter did to one batch; `to_dict()` is ready for any training logger."""
    step: int
    samples: int
    kept: int
    dropped: int
    skipped: bool              # nothing left to train on: the caller skips the optimizer step
    tau: Optional[float]       # None while a percentile filter warms up
    gap_mean: float            # statistics of the finite gaps (NaN when there are none)
    gap_min: float
    gap_max: float
    gap_dropped_mean: float    # mean gap of the dropped samples (NaN when none)

    def to_dict(self, prefix: str = "memo_filter/") -> dict:
        return {prefix + k: v for k, v in asdict(self).items()}


@dataclass
class FilterStats:
    steps: int = 0
    skipped_steps: int = 0
    samples: int = 0
    dropped: int = 0

    @property
    def drop_rate(self) -> float:
        return self.dropped / self.samples if self.samples else 0.0


def _check_tau(tau, source: str) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (numbers.Real, torch.Tensor)) or getattr(tau, "ndim", 0):
        raise ValueError(f"tau must be a number, got {tau!r}{source}")
    value = float(tau)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}{source}")
    return value


class MemorizationFilter:
    """Keeps samples whose gap is under tau; tau is fixed, from a calibration, or a running percentile.

    percentile mode: tau is the given percentile of the last `history` finite gaps; nothing is
    dropped during the first `warmup_steps` batches, while the history fills. A calibration
    gives tau = calibration.threshold(fpr); its scores must be gaps measured the same way as
    in training (same model family, RMS form), or the threshold means nothing.
    """

    def __init__(self, tau: Optional[float] = None, *, percentile: Optional[float] = None,
                 calibration: Optional[Calibration] = None, fpr: float = 0.01,
                 warmup_steps: int = 50, history: int = 4096):
        given = [tau is not None, percentile is not None, calibration is not None]
        if sum(given) != 1:
            raise ValueError("give exactly one of tau, percentile or calibration")
        if percentile is not None and not 0 < percentile < 100:
            raise ValueError(f"percentile must be in (0, 100), got {percentile!r}")
        if warmup_steps < 0 or history < 1:
            raise ValueError(f"need warmup_steps >= 0 and history >= 1, got {warmup_steps} and {history}")
        if calibration is not None:
            tau = _check_tau(calibration.threshold(fpr), f" (from calibration {calibration.model_key!r})")
        self.fixed_tau = None if tau is None else _check_tau(tau, "")
        self.percentile, self.warmup_steps = percentile, warmup_steps
        self.history = deque(maxlen=history)
        self.stats = FilterStats()
        self.last: Optional[StepLog] = None

    @property
    def tau(self) -> Optional[float]:
        """Current threshold; None while a percentile filter is still warming up."""
        if self.fixed_tau is not None:
            return self.fixed_tau
        if self.stats.steps < self.warmup_steps or not self.history:
            return None
        return float(torch.tensor(list(self.history)).quantile(self.percentile / 100))

    def keep_mask(self, gaps: torch.Tensor) -> torch.Tensor:
        """Bool (B,) keep-mask for one batch; updates statistics and `last`. Non-finite gaps are dropped."""
        if not isinstance(gaps, torch.Tensor):
            raise TypeError(f"gaps must be a tensor (B,), got {type(gaps).__name__}")
        device = gaps.device
        gaps = gaps.detach().float().reshape(-1).cpu()
        tau = self.tau
        finite = torch.isfinite(gaps)
        keep = finite if tau is None else finite & (gaps < tau)
        self.history.extend(gaps[finite].tolist())
        n, kept = gaps.numel(), int(keep.sum())
        stat = lambda values, fn: float(fn(values)) if values.numel() else float("nan")
        fin = gaps[finite]
        self.last = StepLog(step=self.stats.steps, samples=n, kept=kept, dropped=n - kept, skipped=kept == 0,
                            tau=tau, gap_mean=stat(fin, torch.mean), gap_min=stat(fin, torch.min),
                            gap_max=stat(fin, torch.max), gap_dropped_mean=stat(gaps[finite & ~keep], torch.mean))
        s = self.stats
        s.steps += 1
        s.samples += n
        s.dropped += n - kept
        s.skipped_steps += kept == 0
        return keep.to(device)

    @staticmethod
    def masked_loss(per_sample_loss: torch.Tensor, keep: torch.Tensor, reduction: str = "mean") -> Optional[torch.Tensor]:
        """Loss over the kept samples only: "mean" is exactly the loss of the kept subset, "sum" its
        sum (for gradient accumulation). None when nothing is kept: skip backward and the step."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if per_sample_loss.dim() != 1 or per_sample_loss.shape != keep.shape or keep.dtype != torch.bool:
            raise ValueError(f"need a per-sample loss (B,) and a bool keep-mask (B,), got "
                             f"{tuple(per_sample_loss.shape)} and {tuple(keep.shape)} {keep.dtype}")
        if not bool(keep.any()):
            return None
        kept = per_sample_loss[keep.to(per_sample_loss.device)]
        return kept.mean() if reduction == "mean" else kept.sum()
