"""The detection score: the size of the text-conditional noise prediction, per image.

Every host speaks one of a few conventions. All of them fit x_t = alpha * x0 + sigma * eps:
  - VP timestep models (diffusers, A1111's DDIM/PLMS/UniPC): alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t)
  - k-diffusion / ComfyUI denoised outputs (x = x0 + sigma * eps): alpha = 1
  - rectified flow (SD3, Flux, Qwen-Image): read as x = x0 + sigma * v (alpha = 1), with the velocity
    v = eps - x0 in the place of eps. Its noise difference eps_c - eps_u = (1 - sigma) (v_c - v_u) vanishes at
    sigma = 1, where flow samplers start, so a flow model's score is the velocity difference, what its CFG
    scales; DDIM in this form is the flow's Euler step, and its noise level (sigma / alpha) is the flow's sigma.
and a prediction is one of: "eps" (noise), "v" (alpha*eps - sigma*x0, VP only), "x0" (the
denoised image) or "flow" (velocity eps - x0). The difference is linear in pred_c - pred_u, so the
score needs neither x nor a second conversion.

Two forms of the gap: the paper's raw L2 over the whole latent, and the RMS (raw / sqrt(numel
per image)), which does not grow with resolution. Verdicts and calibrations use the RMS, of the whole difference
("magnitude", the paper's) or of its detail ("detail_magnitude", the default: see detector_score).
"""
import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .errors import MemoGuardError

PARAMETERIZATIONS = ("eps", "v", "x0", "flow")
Number = Union[float, torch.Tensor]


class ScoreUnavailable(MemoGuardError, ValueError):
    """The gap cannot be computed from what the host handed over (e.g. no uncond at cfg = 1)."""


def check_parameterization(parameterization: str) -> str:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {parameterization!r}; expected one of "
                         f"{', '.join(PARAMETERIZATIONS)} ('epsilon' -> 'eps', 'v_prediction' -> 'v')")
    return parameterization


def _per_image(value: Number, like: torch.Tensor) -> Number:
    """Broadcast a scalar or per-image (B,) coefficient against a (B, ...) tensor."""
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return value.to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))
    return float(value)


def to_eps(pred: torch.Tensor, parameterization: str, x: torch.Tensor, alpha: Number, sigma: Number) -> torch.Tensor:
    """A model output in any parameterization -> the noise eps of x = alpha * x0 + sigma * eps."""
    check_parameterization(parameterization)
    a, s = _per_image(alpha, pred), _per_image(sigma, pred)
    if parameterization == "eps":
        return pred
    if parameterization == "v":  # v = a*eps - s*x0 with a^2 + s^2 = 1
        return a * pred + s * x
    if parameterization == "x0":
        return (x - a * pred) / s
    return pred  # flow: the velocity stands in for eps (x = x0 + sigma * v)


def eps_difference(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, parameterization: str,
                   alpha: Number = 1.0, sigma: Optional[Number] = None) -> torch.Tensor:
    """eps(x, c) - eps(x, empty) from two model outputs of the same x (x cancels out)."""
    check_parameterization(parameterization)
    if pred_cond.shape != pred_uncond.shape:
        raise ValueError(f"cond and uncond predictions differ in shape: {tuple(pred_cond.shape)} "
                         f"vs {tuple(pred_uncond.shape)}")
    diff = pred_cond - pred_uncond
    if parameterization == "eps":
        return diff
    a = _per_image(alpha, diff)
    if parameterization == "flow":
        return diff
    if parameterization == "v":
        return a * diff
    if sigma is None:
        raise ValueError("an 'x0' (denoised) prediction needs sigma to give eps")
    return -a / _per_image(sigma, diff) * diff


def l2_per_image(diff: torch.Tensor) -> torch.Tensor:
    """The paper's raw gap: L2 norm over every non-batch element -> (B,), at least float32."""
    flat = diff.flatten(1)
    return flat.norm(dim=1) if flat.dtype == torch.float64 else flat.float().norm(dim=1)


def rms_per_image(diff: torch.Tensor) -> torch.Tensor:
    """Resolution-independent gap: raw L2 / sqrt(elements per image) -> (B,)."""
    return l2_per_image(diff) / math.sqrt(diff[0].numel())


DETECTORS = ("magnitude", "magnitude_alignment", "anisotropy", "detail_magnitude")
# the detectors a step's score can be read from eps_c - eps_u alone: what a sampler's trace, a calibration's band,
# explanation and mitigation use
STEP_DETECTORS = ("magnitude", "detail_magnitude")
# the verdict's detector where no calibration says otherwise: wins on both evaluation models at the magnitude's cost
# (BENCHMARKS.md, "Detectors side by side on both models")
DEFAULT_DETECTOR = "detail_magnitude"
# Asthana & Belagiannis (arXiv 2601.20642): weights of the L2 norm and of the cosine in their SD v1 evaluation
ANISOTROPY_WEIGHTS = (1.0, 2.0)
ANISOTROPY_LOW_STEP = -3   # the cosine's timestep: the third-to-last of the run's schedule (50-step DDIM: t = 41)


def check_step_detector(detector: str) -> str:
    if detector not in STEP_DETECTORS:
        raise ValueError(f"a step's score is one of {', '.join(STEP_DETECTORS)}; got {detector!r}")
    return detector


def explained_detector(detector: str) -> str:
    """The step score explanation and mitigation work on for a verdict by `detector`: itself, or the magnitude
    for the detectors a step cannot give."""
    return detector if detector in STEP_DETECTORS else "magnitude"


def step_score(diff: torch.Tensor, detector: str = DEFAULT_DETECTOR) -> torch.Tensor:
    """The score of one step per image (B,) from eps_c - eps_u: "magnitude", the paper's RMS gap, or
    "detail_magnitude", the RMS of the difference minus its 3x3 local mean (each channel, and frame, alone).
    Differentiable (mitigation minimizes it). Resolution-independent; `raw_step_score` is the L2 form."""
    check_step_detector(detector)
    if detector == "magnitude":
        return rms_per_image(diff)
    flat = diff.reshape(-1, 1, *diff.shape[-2:])
    flat = flat if flat.dtype == torch.float64 else flat.float()
    local = torch.nn.functional.avg_pool2d(flat, 3, stride=1, padding=1, count_include_pad=False)
    return rms_per_image((flat - local).reshape(diff.shape))


def raw_step_score(diff: torch.Tensor, detector: str = DEFAULT_DETECTOR) -> torch.Tensor:
    """The paper's raw L2 form of step_score (B,)."""
    return step_score(diff, detector) * math.sqrt(diff[0].numel())


def detector_score(eps_c: torch.Tensor, eps_u: torch.Tensor, detector: str = DEFAULT_DETECTOR) -> torch.Tensor:
    """The first-step detection score per image (B,).

    "magnitude": the paper's RMS gap. "magnitude_alignment": the gap times exp(cos(eps_u, eps_c - eps_u)),
    folding in how the text-conditional difference points against the unconditional prediction (after
    Asthana & Belagiannis, arXiv 2601.20642; the product with weight 1 is this project's form). Same two
    forward passes; a cosine more. "detail_magnitude" (this project's, not a paper's): the RMS of the
    difference minus its 3x3 local mean. At the first step the difference is the text's pull on the predicted
    image; any caption pulls its colours and layout (low frequencies: a snowy or night scene far from the
    unconditional mean scores high without being recalled), only a recalled image pulls its details.
    Same two forward passes; a 3x3 average more.
    """
    if detector not in DETECTORS:
        raise ValueError(f"detector must be one of {', '.join(DETECTORS)}; got {detector!r}")
    if detector == "anisotropy":
        raise ValueError("the anisotropy detector needs the predictions at two noise levels: anisotropy_score")
    diff = eps_c - eps_u
    if detector in STEP_DETECTORS:
        return step_score(diff, detector)
    cos = torch.nn.functional.cosine_similarity(eps_u.flatten(1).float(), diff.flatten(1).float(), dim=1)
    return rms_per_image(diff) * torch.exp(cos)


def anisotropy_score(diff_first: torch.Tensor, eps_u_low: torch.Tensor, diff_low: torch.Tensor,
                     weights=ANISOTROPY_WEIGHTS) -> torch.Tensor:
    """Asthana & Belagiannis's detection score per image (B,), both terms on the same pure noise x_T:
    weights[0] x the L2 norm of eps_c - eps_u at the first step (the isotropic, high-noise term: Wen et al.'s
    magnitude, unnormalised), plus weights[1] x the cosine between eps_u and eps_c - eps_u where x_T is
    presented at a low noise level (the anisotropic term: memorized prompts align the guidance with the
    unconditional score there), taken along the channels at each latent position and averaged over positions."""
    norm = l2_per_image(diff_first)
    cos = torch.nn.functional.cosine_similarity(eps_u_low.float(), diff_low.float(), dim=1).flatten(1).mean(1)
    return weights[0] * norm + weights[1] * cos


def uncond_is_missing(pred_uncond: Optional[torch.Tensor]) -> bool:
    """ComfyUI skips the uncond pass at cfg = 1 and hands over zeros; treat those as missing."""
    return pred_uncond is None or not bool(torch.any(pred_uncond != 0))


@dataclass
class ScoreTrace:
    """Per-step scores of one generation (all images of a batch), by one of STEP_DETECTORS.

    record() keeps device tensors and never synchronises; steps() moves them to the CPU at
    once. Samplers of second order evaluate the model more than once per step: only the first
    call of each step is kept, so a step's score is always taken at the step's own x_t.
    """
    numel: Optional[int] = None                  # elements per image, for the raw form
    detector: str = DEFAULT_DETECTOR             # a run is scored one way: a calibration of that detector judges it
    _steps: list = field(default_factory=list)   # [(step, sigma_or_t, score tensor (B,))]
    unavailable: Optional[str] = None            # why no score exists (cfg = 1, NGMS ...)

    def __post_init__(self):
        check_step_detector(self.detector)

    def record(self, step: int, diff: torch.Tensor, t: Optional[float] = None) -> torch.Tensor:
        """Record eps_c - eps_u of one step; returns its score per image (device tensor)."""
        if self._steps and self._steps[-1][0] >= step:
            return self._steps[-1][2]
        score = step_score(diff.detach(), self.detector)
        self.numel = diff[0].numel()
        self._steps.append((step, t, score))
        return score

    def mark_unavailable(self, reason: str) -> None:
        self.unavailable = reason

    def __len__(self) -> int:
        return len(self._steps)

    def per_step(self) -> torch.Tensor:
        """(steps, B) float CPU tensor of the steps' scores; NaN where the model output was not finite."""
        if not self._steps:
            return torch.empty(0, 0)
        return torch.stack([r for _, _, r in self._steps]).cpu()

    def step_indices(self) -> list:
        return [s for s, _, _ in self._steps]

    def score(self, window: int = 1, start: int = 0) -> torch.Tensor:
        """Mean score over the recorded steps numbered [start, start + window) per image -> (B,).
        First step by default; a window none of whose steps was recorded has no score."""
        if self.unavailable:
            raise ScoreUnavailable(self.unavailable)
        if window < 1 or start < 0:
            raise ValueError(f"window must be >= 1 and start >= 0 (got window={window}, start={start})")
        if not self._steps:
            raise ScoreUnavailable("no sampling step was recorded")
        rows = [i for i, step in enumerate(self.step_indices()) if start <= step < start + window]
        if not rows:
            raise ScoreUnavailable(f"steps {start} to {start + window - 1} were not recorded "
                                   f"(recorded: {self.step_indices()[0]} to {self.step_indices()[-1]})")
        return self.per_step()[rows].mean(dim=0)

    def raw_score(self, window: int = 1, start: int = 0) -> torch.Tensor:
        """The paper's raw L2 form of score()."""
        return self.score(window, start) * math.sqrt(self.numel)

    def to_dict(self) -> dict:
        gaps = self.per_step()
        return {"steps": self.step_indices(), "t": [t for _, t, _ in self._steps],
                "rms": gaps.T.tolist(), "detector": self.detector, "numel": self.numel,
                "unavailable": self.unavailable}


def coefficients_vp(alphas_cumprod: torch.Tensor, t: Union[int, torch.Tensor]):
    """(alpha, sigma) of a VP (DDPM-style) schedule at integer timestep(s) t."""
    abar = alphas_cumprod[torch.as_tensor(t, device=alphas_cumprod.device).long()]
    return abar.sqrt(), (1 - abar).sqrt()

