"""Inference-time mitigation: shrink the text-conditional noise prediction before sampling.

AdamW on the conditional prompt embedding (every BOS position frozen, uncond fixed), loss =
RMS gap at the first step on the very x_T the generation then starts from; stop early once
every image is at or under `target`. The optimised embedding is then used for every step.
"""
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from .model import DiffusionModel, PromptEncoding
from .score import rms_per_image

MODES = ("off", "always", "auto")


@dataclass
class MitigationRecord:
    mode: str
    ran: bool
    iterations: int = 0
    losses: List[List[float]] = field(default_factory=list)  # per iteration, per image (RMS gap)
    before: List[float] = field(default_factory=list)         # first-step RMS gap per image
    after: List[float] = field(default_factory=list)
    reason: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def check_settings(mode: str, lr: float, max_iters: int, target: float) -> None:
    if mode not in MODES:
        raise ValueError(f"mitigation mode must be one of {MODES}, got {mode!r}")
    if not (lr > 0) or max_iters < 0 or not (target >= 0):
        raise ValueError(f"need lr > 0, max_iters >= 0, target >= 0 (got {lr}, {max_iters}, {target})")


def first_step_gap(model: DiffusionModel, cond: PromptEncoding, uncond: PromptEncoding,
                   x_T: torch.Tensor, t_first, embedding: Optional[torch.Tensor] = None) -> torch.Tensor:
    eps_c, eps_u = model.eps_pair(x_T, t_first, cond, uncond, embedding)
    return rms_per_image(eps_c - eps_u)


def minimize_embedding(model: DiffusionModel, cond: PromptEncoding, uncond: PromptEncoding,
                       x_T: torch.Tensor, t_first, *, mode: str = "always", threshold: Optional[float] = None,
                       target: float = 0.0, lr: float = 0.05, max_iters: int = 10):
    """Returns (embedding to sample with, MitigationRecord). mode "auto" needs `threshold`.

    cond must hold one prompt per image of x_T. Images already at or under `target` stop moving
    (their rows are restored after each AdamW step), so one image never pays for another.
    """
    check_settings(mode, lr, max_iters, target)
    emb0 = cond.embedding.detach()
    with torch.no_grad():
        before = first_step_gap(model, cond, uncond, x_T, t_first).float().cpu()
    record = MitigationRecord(mode=mode, ran=False, before=before.tolist(), after=before.tolist())
    if mode == "off":
        record.reason = "mitigation off"
        return emb0, record
    if mode == "auto":
        if threshold is None:
            raise ValueError("mode 'auto' needs a threshold (from a calibration)")
        if not bool((before >= threshold).any()):
            record.reason = f"first-step score under threshold {threshold:.4g}"
            return emb0, record
    active = torch.isfinite(before) & (before > target)
    if mode == "auto":
        active &= before >= threshold
    frozen_positions = cond.frozen_mask.to(emb0.device).unsqueeze(-1)
    emb = emb0.clone().float().requires_grad_(True)
    opt = torch.optim.AdamW([emb], lr=lr)
    record.ran = True
    for _ in range(max_iters):
        with torch.enable_grad():
            gap = first_step_gap(model, cond, uncond, x_T, t_first, emb.to(emb0.dtype))
            active &= gap.detach().float().cpu() > target
            if not bool(active.any()):
                break
            loss = (gap * active.to(gap.device)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        keep = frozen_positions | ~active.to(emb0.device).reshape(-1, 1, 1)
        with torch.no_grad():
            emb.data = torch.where(keep, emb0.float(), emb.data)
        record.iterations += 1
        record.losses.append(gap.detach().float().cpu().tolist())
    with torch.no_grad():
        record.after = first_step_gap(model, cond, uncond, x_T, t_first, emb.detach().to(emb0.dtype)).float().cpu().tolist()
    return emb.detach().to(emb0.dtype), record
