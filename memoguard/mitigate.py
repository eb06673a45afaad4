"""Inference-time mitigation: shrink the text-conditional noise prediction before sampling.

AdamW on the conditional prompt embedding (every BOS position frozen, uncond fixed), loss =
RMS gap at the first step on the very x_T the generation then starts from; stop early once
every image is at or under `target`. The optimised embedding is then used for every step.
"""
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from .model import DiffusionModel, PromptEncoding, expand_batch, match_length
from .score import rms_per_image

MODES = ("off", "always", "auto")


@dataclass
class MitigationRecord:
    mode: str
    ran: bool
    iterations: int = 0                                       # AdamW steps taken for the batch
    image_iterations: List[int] = field(default_factory=list)  # steps each image actually moved
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


def minimize_embedding(model: DiffusionModel, cond: PromptEncoding, uncond: PromptEncoding,
                       x_T: torch.Tensor, t_first, *, mode: str = "always", threshold: Optional[float] = None,
                       target: float = 0.0, lr: float = 0.05, max_iters: int = 10):
    """Returns (embedding to sample with, MitigationRecord). mode "auto" needs `threshold`.

    cond must hold one prompt per image of x_T. Images already at or under `target` stop moving
    (their rows are restored after each AdamW step), so one image never pays for another.
    """
    check_settings(mode, lr, max_iters, target)
    emb0 = cond.embedding.detach()
    batch = emb0.shape[0]
    with torch.no_grad():  # x_T and the uncond embedding are fixed: one uncond pass serves every iteration
        uncond_emb = match_length(uncond.embedding, emb0.shape[1]).expand(batch, -1, -1)
        eps_u = model.eps(x_T, t_first, uncond_emb, {k: expand_batch(v, batch) for k, v in uncond.extra.items()})
        gap = rms_per_image(model.eps(x_T, t_first, emb0, cond.extra) - eps_u).float().cpu()
    record = MitigationRecord(mode=mode, ran=False, before=gap.tolist(), after=gap.tolist(),
                              image_iterations=[0] * batch)
    if mode == "off":
        record.reason = "mitigation off"
        return emb0, record
    active = torch.isfinite(gap) & (gap > target)
    if mode == "auto":
        if threshold is None:
            raise ValueError("mode 'auto' needs a threshold (from a calibration)")
        flagged = gap >= threshold
        if not bool(flagged.any()):
            record.reason = f"first-step score under threshold {threshold:.4g}"
            return emb0, record
        active &= flagged
    if not bool(active.any()):
        record.reason = f"first-step score already at or under target {target:.4g}"
        return emb0, record
    frozen_positions = cond.frozen_mask.to(emb0.device).unsqueeze(-1)
    emb = emb0.clone().float().requires_grad_(True)
    opt = torch.optim.AdamW([emb], lr=lr)
    record.ran = True
    gap_at = lambda e: rms_per_image(model.eps(x_T, t_first, e.to(emb0.dtype), cond.extra) - eps_u)
    for _ in range(max_iters):
        with torch.enable_grad():
            gap_t = gap_at(emb)
        gap = gap_t.detach().float().cpu()
        record.losses.append(gap.tolist())
        active &= gap > target
        if not bool(active.any()):
            break
        with torch.enable_grad():  # hosts sample under no_grad: the masked sum must join the graph too
            # autograd.grad, not backward(): the host's weights must not collect .grad
            (emb.grad,) = torch.autograd.grad((gap_t * active.to(gap_t.device)).sum(), [emb])
        held = emb.detach().clone()
        opt.step()
        with torch.no_grad():  # BOS never moves; images already at target keep their embedding
            moving = active.to(emb0.device).reshape(-1, 1, 1) & ~frozen_positions
            emb.data = torch.where(moving, emb.data, torch.where(frozen_positions, emb0.float(), held))
        record.iterations += 1
        record.image_iterations = [n + int(a) for n, a in zip(record.image_iterations, active.tolist())]
    else:  # ran out of iterations: measure where the last step landed
        with torch.no_grad():
            gap = gap_at(emb).float().cpu()
    record.after = gap.tolist()
    return emb.detach().to(emb0.dtype), record
