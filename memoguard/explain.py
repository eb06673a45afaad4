"""Token-wise significance: which words make the model regurgitate.

score_i = || d gap / d e_i ||_2, with gap = ||eps(x_t, e) - eps(x_t, e_empty)||_2 and e_i the
text-encoder output at position i, averaged over the first `steps` sampling steps and over
generations (Wen et al., Sec. 4). Between steps the generation follows ordinary guided DDIM.
"""
from dataclasses import dataclass
from typing import List, Optional

import torch

from .model import DiffusionModel, PromptEncoding, ddim_step
from .score import l2_per_image


@dataclass
class TokenContributions:
    """Per-token scores of one prompt, aligned with its tokens (BOS/EOS/padding left out)."""
    tokens: List[str]
    scores: List[float]          # raw gradient norms, averaged over steps and generations
    positions: List[int]         # index of each token in the (possibly multi-chunk) embedding

    @property
    def shares(self) -> List[float]:
        total = sum(self.scores)
        return [s / total if total > 0 else 0.0 for s in self.scores]

    def top(self, k: int = 3):
        order = sorted(range(len(self.scores)), key=lambda i: -self.scores[i])
        return [(self.tokens[i], self.shares[i]) for i in order[:k]]

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "scores": self.scores, "shares": self.shares, "positions": self.positions}


def token_contributions(model: DiffusionModel, cond: PromptEncoding, uncond: PromptEncoding,
                        x_T: torch.Tensor, steps: int = 1, guidance: Optional[float] = None,
                        total_steps: int = 50) -> List[TokenContributions]:
    """Contributions for each prompt of `cond`; x_T is (B * generations, ...) laid out prompt-major.

    steps: how many of the first sampling steps of a `total_steps` schedule to average over.
    """
    batch = cond.embedding.shape[0]
    if x_T.shape[0] % batch:
        raise ValueError(f"x_T has {x_T.shape[0]} images, not a multiple of {batch} prompts")
    gens = x_T.shape[0] // batch
    if not 1 <= steps <= total_steps:
        raise ValueError(f"steps must be in [1, {total_steps}], got {steps}")
    rep = lambda t: t.repeat_interleave(gens, dim=0)
    cond_g = PromptEncoding(rep(cond.embedding.detach()), [tok for tok in cond.tokens for _ in range(gens)],
                            rep(cond.prompt_mask), rep(cond.frozen_mask),
                            {k: rep(v) for k, v in cond.extra.items()})
    ts = model.timesteps(total_steps)
    guidance = model.guidance if guidance is None else guidance
    x = x_T
    grad_norms = torch.zeros(cond_g.embedding.shape[:2])
    for i in range(steps):
        emb = cond_g.embedding.clone().requires_grad_(True)
        with torch.enable_grad():
            eps_c, eps_u = model.eps_pair(x, ts[i], cond_g, uncond, emb)
            gap = l2_per_image(eps_c - eps_u)
            (grad,) = torch.autograd.grad(gap.sum(), [emb])  # images are independent: sum = per-image grads
        grad_norms += grad.float().norm(dim=-1).cpu()
        if i + 1 < steps:
            with torch.no_grad():
                eps = eps_u + guidance * (eps_c - eps_u)
                x = ddim_step(x, eps.detach(), model.coefficients(ts[i]), model.coefficients(ts[i + 1]))
    grad_norms = (grad_norms / steps).reshape(batch, gens, -1).mean(dim=1)
    out = []
    for b in range(batch):
        positions = [i for i, keep in enumerate(cond.prompt_mask[b].tolist()) if keep]
        out.append(TokenContributions([cond.tokens[b][i] for i in positions],
                                      [float(grad_norms[b, i]) for i in positions], positions))
    return out
