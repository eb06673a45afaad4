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

The gap of an ordinary sample falls several-fold from small to large timesteps, so one tau on
raw gaps drops mostly small-t samples and lets a memorized pair train freely at large t. A
`TimestepReference` (the ordinary gap per timestep band, fitted on gaps measured the training
way) makes the gaps relative: keep_mask(gaps, timesteps) then compares gap / reference(t) to tau.

Duplicated pairs that the model partly memorizes still slip through at the timesteps where their
gap looks ordinary. With `bar_alpha` and a key per sample (its caption, an image hash: whatever
the copies share), the filter also counts, per key, how often its samples were dropped; a key
dropped more often than an ordinary pair could be at the filter's nominal rate (binomial tail
probability under bar_alpha) is barred, and all its later samples are dropped. `filt.barred`
lists the barred keys and the step each was barred at: a list to deduplicate the data set with.

Gradient accumulation: take reduction="sum" per micro-batch and divide the gradients by the
number of samples kept in the whole window before the optimizer step; that is exactly the mean
loss over the kept samples of the accumulated batch.
"""
import hashlib
import json
import math
import numbers
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Hashable, List, Optional, Sequence

import torch

from .calibration import Calibration
from .score import eps_difference, rms_per_image


def gaps_from_predictions(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, parameterization: str = "eps",
                          alpha=1.0, sigma=None) -> torch.Tensor:
    """Per-sample RMS gap (B,) float32 from the step's own cond prediction and an uncond one."""
    with torch.no_grad():  # float32 first: under autocast the predictions may be fp16/bf16
        return rms_per_image(eps_difference(pred_cond.detach().float(), pred_uncond.detach().float(),
                                            parameterization, alpha, sigma))


def sample_key(encoding: torch.Tensor) -> str:
    """A caption's key for barring where only its text-encoder output is at hand (a training node's batch): the
    same caption encodes to the same values, so a hash of them (float32, 4 decimals) names the caption."""
    values = torch.round(encoding.detach().float().cpu() * 1e4).to(torch.int64)
    return hashlib.sha1(values.numpy().tobytes()).hexdigest()[:16]


def kept_gradient(prediction: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The prediction unchanged in value whose gradient, under any loss that averages an element-wise term over
    the batch (MSE, L1, Huber), is that loss's over the kept samples only: dropped samples pass no gradient and
    the kept ones' is scaled by B / kept. For trainers that take the batch-mean loss of the prediction where no
    hook reaches (ComfyUI's training node): the same update as masked_loss(..., "mean"). Nothing kept: every
    gradient is zero, and backward still runs."""
    if keep.dtype != torch.bool or keep.shape != prediction.shape[:1]:
        raise ValueError(f"need a bool keep-mask (B,) for a prediction of {tuple(prediction.shape)}, got "
                         f"{tuple(keep.shape)} {keep.dtype}")
    weight = keep.float() * (keep.numel() / max(int(keep.sum()), 1))
    weight = weight.to(prediction.device, prediction.dtype).reshape(-1, *[1] * (prediction.dim() - 1))
    fixed = prediction.detach()
    return fixed + (prediction - fixed) * weight


@dataclass
class TimestepReference:
    """Median gap of ordinary training samples in equal timestep bands over [0, num_train_timesteps)."""
    medians: List[float]
    num_train_timesteps: int = 1000

    def __post_init__(self):
        self.medians = [float(m) for m in self.medians]
        if not self.medians or not all(math.isfinite(m) and m > 0 for m in self.medians):
            raise ValueError(f"reference medians must be finite numbers > 0, got {self.medians}")

    @classmethod
    def fit(cls, gaps: torch.Tensor, timesteps: torch.Tensor, bands: int = 10,
            num_train_timesteps: int = 1000) -> "TimestepReference":
        """From gaps of ordinary pairs measured the training way (random t, own noise); every band
        needs at least 8 finite samples."""
        gaps, band = gaps.detach().float().reshape(-1).cpu(), cls._band(timesteps, bands, num_train_timesteps)
        if band.shape != gaps.shape:
            raise ValueError(f"need one timestep per gap, got {tuple(timesteps.shape)} for {tuple(gaps.shape)}")
        medians = []
        for b in range(bands):
            values = gaps[(band == b) & torch.isfinite(gaps)]
            if values.numel() < 8:
                raise ValueError(f"timestep band {b} of {bands} has {values.numel()} samples; "
                                 "fit on more samples or fewer bands")
            medians.append(float(values.median()))
        return cls(medians, num_train_timesteps)

    @staticmethod
    def _band(timesteps, bands: int, num_train_timesteps: int) -> torch.Tensor:
        t = torch.as_tensor(timesteps).detach().reshape(-1).cpu().float()
        return (t * bands / num_train_timesteps).long().clamp(0, bands - 1)

    def relative(self, gaps: torch.Tensor, timesteps) -> torch.Tensor:
        """gap / typical ordinary gap at the sample's timestep."""
        band = self._band(timesteps, len(self.medians), self.num_train_timesteps)
        if band.shape != gaps.shape:
            raise ValueError(f"need one timestep per gap, got {band.numel()} timesteps for {gaps.numel()} gaps")
        return gaps / torch.tensor(self.medians)[band]

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path) -> "TimestepReference":
        return cls(**json.loads(Path(path).read_text()))


@dataclass
class StepLog:
    """What the filter did to one batch; `to_dict()` is ready for any training logger."""
    step: int
    samples: int
    kept: int
    dropped: int
    skipped: bool              # nothing left to train on: the caller skips the optimizer step
    tau: Optional[float]       # None while a percentile filter warms up
    gap_mean: float            # statistics of the finite gaps, relative ones with a reference (NaN when none)
    gap_min: float
    gap_max: float
    gap_dropped_mean: float    # mean gap of the dropped samples (NaN when none)
    dropped_by_key: int = 0    # dropped only because their key is barred
    barred_keys: int = 0       # keys barred so far

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


def _binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
                 for i in range(k, n + 1)]
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


class MemorizationFilter:
    """Keeps samples whose gap is under tau; tau is fixed, from a calibration, or a running percentile.

    percentile mode: tau is the given percentile of the last `history` finite gaps; nothing is
    dropped during the first `warmup_steps` batches, while the history fills. A calibration
    gives tau = calibration.threshold(fpr); its scores must be gaps measured the same way as
    in training (same model family, RMS form), or the threshold means nothing. With a
    `reference`, every gap is divided by the reference at its timestep first (tau, percentile
    and calibration scores are then relative gaps) and keep_mask needs the timesteps. With
    `bar_alpha`, keys passed to keep_mask are barred as the module docstring says; the nominal
    drop rate is `fpr` (calibration) or 1 - percentile/100, so a fixed tau cannot bar keys. Keys
    are counted only after `warmup_steps` batches: a caption whose words the model has not
    learned yet has a high gap before any memorization, and must not be barred for that.
    """

    def __init__(self, tau: Optional[float] = None, *, percentile: Optional[float] = None,
                 calibration: Optional[Calibration] = None, fpr: float = 0.01,
                 warmup_steps: int = 50, history: int = 4096, reference: Optional[TimestepReference] = None,
                 bar_alpha: Optional[float] = None):
        given = [tau is not None, percentile is not None, calibration is not None]
        if sum(given) != 1:
            raise ValueError("give exactly one of tau, percentile or calibration")
        if percentile is not None and not 0 < percentile < 100:
            raise ValueError(f"percentile must be in (0, 100), got {percentile!r}")
        if warmup_steps < 0 or history < 1:
            raise ValueError(f"need warmup_steps >= 0 and history >= 1, got {warmup_steps} and {history}")
        if bar_alpha is not None:
            if not 0 < bar_alpha < 1:
                raise ValueError(f"bar_alpha must be in (0, 1), got {bar_alpha!r}")
            if tau is not None:
                raise ValueError("barring keys needs the filter's nominal drop rate: use calibration= or percentile=, not tau=")
        if calibration is not None:
            tau = _check_tau(calibration.threshold(fpr), f" (from calibration {calibration.model_key!r})")
        self.fixed_tau = None if tau is None else _check_tau(tau, "")
        self.percentile, self.warmup_steps, self.reference = percentile, warmup_steps, reference
        self.bar_alpha = bar_alpha
        self.nominal_drop_rate = fpr if calibration is not None else None if percentile is None else 1 - percentile / 100
        self.key_counts = {}       # key -> [samples seen, samples dropped on their gap]
        self.barred = {}           # key -> step it was barred at
        self.history = deque(maxlen=history)
        self.stats = FilterStats()
        self.last: Optional[StepLog] = None

    @classmethod
    def relative_to_ordinary(cls, gaps: torch.Tensor, timesteps, fpr: float, **settings) -> "MemorizationFilter":
        """The recommended filter (train-filter-demo): gaps relative to the ordinary gap of their timestep band
        (a TimestepReference fitted on `gaps`, ordinary samples measured the training way), tau at the share
        `fpr` of them dropped. settings: bar_alpha, warmup_steps, history."""
        reference = TimestepReference.fit(gaps, timesteps)
        calibration = Calibration("ordinary-training-gaps", reference.relative(gaps.detach().float().reshape(-1).cpu(),
                                                                             timesteps).tolist())
        return cls(calibration=calibration, fpr=fpr, reference=reference, **settings)

    @property
    def tau(self) -> Optional[float]:
        """Current threshold; None while a percentile filter is still warming up."""
        if self.fixed_tau is not None:
            return self.fixed_tau
        if self.stats.steps < self.warmup_steps or not self.history:
            return None
        return float(torch.tensor(list(self.history)).quantile(self.percentile / 100))

    def keep_mask(self, gaps: torch.Tensor, timesteps=None, keys: Optional[Sequence[Hashable]] = None) -> torch.Tensor:
        """Bool (B,) keep-mask for one batch; updates statistics and `last`. Non-finite gaps are
        dropped. `timesteps` (B,) is needed when the filter has a reference, ignored otherwise.
        `keys`: one per sample (None for a sample not to track, e.g. a caption-dropped one),
        used when the filter bars keys."""
        if not isinstance(gaps, torch.Tensor):
            raise TypeError(f"gaps must be a tensor (B,), got {type(gaps).__name__}")
        device = gaps.device
        gaps = gaps.detach().float().reshape(-1).cpu()
        if self.reference is not None:
            if timesteps is None:
                raise ValueError("this filter compares gaps relative to a TimestepReference: pass the batch's timesteps")
            gaps = self.reference.relative(gaps, timesteps)
        tau = self.tau
        finite = torch.isfinite(gaps)
        keep = finite if tau is None else finite & (gaps < tau)
        dropped_by_key = 0
        if self.bar_alpha is not None and keys is not None:
            if len(keys) != gaps.numel():
                raise ValueError(f"need one key per sample, got {len(keys)} keys for {gaps.numel()} gaps")
            by_key = self._bar_keys(keys, keep, tau is not None and self.stats.steps >= self.warmup_steps)
            dropped_by_key = int((keep & ~by_key).sum())
            keep &= by_key
        self.history.extend(gaps[finite].tolist())
        n, kept = gaps.numel(), int(keep.sum())
        stat = lambda values, fn: float(fn(values)) if values.numel() else float("nan")
        fin = gaps[finite]
        self.last = StepLog(step=self.stats.steps, samples=n, kept=kept, dropped=n - kept, skipped=kept == 0,
                            tau=tau, gap_mean=stat(fin, torch.mean), gap_min=stat(fin, torch.min),
                            gap_max=stat(fin, torch.max), gap_dropped_mean=stat(gaps[finite & ~keep], torch.mean),
                            dropped_by_key=dropped_by_key, barred_keys=len(self.barred))
        s = self.stats
        s.steps += 1
        s.samples += n
        s.dropped += n - kept
        s.skipped_steps += kept == 0
        return keep.to(device)

    def _bar_keys(self, keys, gap_keep: torch.Tensor, counting: bool) -> torch.Tensor:
        """Bool (B,): False for samples whose key is barred (now or earlier); updates the counts if `counting`."""
        if counting:
            for key, kept in zip(keys, gap_keep.tolist()):
                if key is None or key in self.barred:
                    continue
                counts = self.key_counts.setdefault(key, [0, 0])
                counts[0] += 1
                counts[1] += not kept
                if not kept and _binomial_tail(counts[1], counts[0], self.nominal_drop_rate) < self.bar_alpha:
                    self.barred[key] = self.stats.steps
        return torch.tensor([key is None or key not in self.barred for key in keys], dtype=torch.bool)

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
