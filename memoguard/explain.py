"""Token-wise significance: which words make the model regurgitate.

All methods attribute gap = ||eps(x_t, e) - eps(x_t, e_empty)||_2 (the paper's raw L2) to the
text-encoder output e_i at each prompt position, averaged over the first `steps` sampling steps
and over generations; between steps the generation follows ordinary guided DDIM.
  - "gradient_norm":        ||d gap / d e_i||_2 (Wen et al., Sec. 4, the paper's method). Says how
                            sensitive the gap is at a position, not what removing the token does.
  - "gradient_x_delta":     d gap / d e_i . (e_i - e_empty,i): the first-order change of the gap
                            when position i is set to the empty prompt's output there.
  - "integrated_gradients": the same product along the straight path from e_empty to e
                            (`ig_steps` gradients); the scores add up to the gap.
  - "leave_one_out":        gap(e) - gap(prompt without token i), one batched forward per token.
                            Where the adapter can re-encode (DiffusionModel.encode_without) the
                            prompt is encoded again without the token: the sound removal for a
                            causal text encoder (CLIP), which writes each token into every later
                            position. Elsewhere, and as "leave_one_out_embedding", position i
                            alone takes the empty prompt's output, which leaves the token in the
                            later positions.
The three last are signed (negative: the token lowers the gap); shares count positive scores only.
Default (`default_method`): leave-one-out where the adapter re-encodes and the prompt is short enough
to stay within the mitigation's budget of 10 forward + backward passes (~30 forwards); gradient x
input otherwise. Leave-one-out in the embedding depends on what the host's empty prompt holds at each
position: in the real ComfyUI (which pads with EOS) emptying any one position raised the score of a
memorized prompt, so it is an option, not a default. `bench` measures all of them (BENCHMARKS.md).
"""
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from .errors import MemoGuardError
from .model import Denoiser, DiffusionModel, PromptEncoding, check_stop, ddim_step, gap_gradients
from .score import l2_per_image

METHODS = ("auto", "leave_one_out", "leave_one_out_embedding", "gradient_x_delta", "integrated_gradients",
           "gradient_norm")
METHOD_NAMES = {"leave_one_out": "leave-one-out", "leave_one_out_embedding": "leave-one-out (embedding)",
                "gradient_x_delta": "gradient x input", "integrated_gradients": "integrated gradients",
                "gradient_norm": "gradient norm (paper)"}
LEAVE_ONE_OUT_MAX_TOKENS = 29  # n + 1 forwards per step: the cost of 10 forward + backward passes

class ExplanationError(MemoGuardError, ValueError):
    """Settings of an explanation that cannot work."""


@dataclass
class TokenContributions:
    """Per-token scores of one prompt, aligned with its tokens (BOS/EOS/padding left out)."""
    tokens: List[str]
    scores: List[float]          # the method's scores, averaged over steps and generations
    positions: List[int]         # index of each token in the (possibly multi-chunk) embedding
    method: str = "gradient_norm"

    @property
    def shares(self) -> List[float]:
        positive = [max(s, 0.0) for s in self.scores]
        total = sum(positive)
        return [s / total if total > 0 else 0.0 for s in positive]

    @property
    def method_name(self) -> str:
        return METHOD_NAMES[self.method]

    def ranking(self) -> List[int]:
        """Indices into tokens, most blamed first."""
        return sorted(range(len(self.scores)), key=lambda i: -self.scores[i])

    def top(self, k: int = 3):
        shares = self.shares
        return [(self.tokens[i], shares[i]) for i in self.ranking()[:k]]

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "scores": self.scores, "shares": self.shares, "positions": self.positions,
                "method": self.method, "method_name": self.method_name}


def average_contributions(runs: List[TokenContributions]) -> Optional[TokenContributions]:
    """One prompt's contributions averaged over runs (steps, images) of the same tokens."""
    if not runs:
        return None
    first = runs[0]
    if any(r.tokens != first.tokens or r.method != first.method for r in runs):
        raise ExplanationError("cannot average contributions of different prompts or methods")
    scores = [sum(r.scores[i] for r in runs) / len(runs) for i in range(len(first.scores))]
    return TokenContributions(first.tokens, scores, first.positions, first.method)


def _reference(uncond_embedding: torch.Tensor, length: int) -> torch.Tensor:
    """The unconditional prompt's output at each of the prompt's `length` positions (a shorter one repeats, as the
    hosts repeat it for CFG; a longer negative prompt contributes its first positions)."""
    repeats = -(-length // uncond_embedding.shape[1])
    return uncond_embedding.repeat(1, repeats, 1)[:, :length]


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ExplanationError(f"explanation method must be one of {', '.join(METHODS)}; got {method!r}")
    return method


def _reencodes(model: Denoiser, cond: PromptEncoding) -> bool:
    return model.reencodes and cond.ids is not None


def default_method(model: Denoiser, cond: PromptEncoding) -> str:
    longest = int(cond.prompt_mask.sum(dim=1).max()) if cond.prompt_mask.numel() else 0
    return "leave_one_out" if _reencodes(model, cond) and longest <= LEAVE_ONE_OUT_MAX_TOKENS else "gradient_x_delta"


def _gap(model, x, t, cond, uncond, emb):
    eps_c, eps_u = model.eps_pair(x, t, cond, uncond, emb)
    return l2_per_image(eps_c - eps_u)


def _gradient(model, x, t, cond, eps_u, emb, grad_batch, should_stop):
    return gap_gradients(model, x, t, cond, eps_u, emb, gap_of=l2_per_image, grad_batch=grad_batch,
                         should_stop=should_stop)[1]


def _leave_one_out(model, x, t, cond, uncond, empty, prompt_rows, batch_size, gens, reencode, should_stop):
    """(N, L) gap drop when one prompt token at a time is left out (re-encoded, or its position emptied)."""
    emb = cond.embedding
    out = torch.zeros(emb.shape[:2])
    with torch.no_grad():
        base = _gap(model, x, t, cond, uncond, emb).float().cpu()
        jobs = [(b, i) for b in range(emb.shape[0]) for i in prompt_rows[b]]
        for start in range(0, len(jobs), batch_size):
            check_stop(should_stop)
            part = jobs[start:start + batch_size]
            rows = torch.tensor([b for b, _ in part])
            if reencode is not None:  # cond_g row b holds prompt b // gens
                sub = model.encode_without(reencode, [(b // gens, [i]) for b, i in part])
                sub = sub.with_embedding(sub.embedding.to(emb))
            else:
                sub = cond.rows(rows)
                edited = sub.embedding.clone()
                for k, (_, i) in enumerate(part):
                    edited[k, i] = empty[0, i]
                sub = sub.with_embedding(edited)
            # a host's uncond may hold one row per image: the jobs' images take theirs
            sub_uncond = uncond.rows(rows) if uncond.embedding.shape[0] == emb.shape[0] > 1 else uncond
            gaps = _gap(model, x[rows.to(x.device)], t, sub, sub_uncond, sub.embedding).float().cpu()
            for k, (b, i) in enumerate(part):
                out[b, i] = base[b] - gaps[k]
    return out


def _attribute(method, model, x, t, cond, uncond, empty, prompt_rows, ig_steps, batch_size, gens, reencode,
               grad_batch, should_stop):
    emb = cond.embedding
    if method in ("leave_one_out", "leave_one_out_embedding"):
        return _leave_one_out(model, x, t, cond, uncond, empty, prompt_rows, batch_size, gens, reencode, should_stop)
    with torch.no_grad():  # the uncond pass needs no gradient: computed once, apart
        eps_u = model.eps_uncond(x, t, uncond, emb.shape[1])
    gradient = lambda e: _gradient(model, x, t, cond, eps_u, e, grad_batch, should_stop)
    if method == "gradient_norm":
        return gradient(emb).norm(dim=-1).cpu()
    delta = (emb - empty).float()
    if method == "gradient_x_delta":
        grad = gradient(emb)
    else:  # integrated gradients, midpoint rule on the path e_empty -> e
        grad = sum(gradient(empty + (k + 0.5) / ig_steps * (emb - empty)) for k in range(ig_steps)) / ig_steps
    return (grad * delta).sum(dim=-1).cpu()


def token_contributions(model: Denoiser, cond: PromptEncoding, uncond: PromptEncoding,
                        x_T: torch.Tensor, steps: int = 1, guidance: Optional[float] = None,
                        total_steps: int = 50, method: str = "auto", ig_steps: int = 4,
                        batch_size: int = 16, timesteps: Optional[Sequence] = None, grad_batch: int = 1,
                        should_stop: Optional[Callable[[], bool]] = None) -> List[TokenContributions]:
    """Contributions for each prompt of `cond`; x_T is (B * generations, ...) laid out prompt-major.

    steps: how many of the first sampling steps of a `total_steps` schedule to average over.
    method: one of METHODS; "auto" is `default_method`. Each result names the method it used.
    batch_size: images per forward of leave-one-out's edited prompts.
    timesteps: the schedule's first `steps` timesteps (or sigmas) themselves, instead of the model's
    `total_steps` schedule (a bare Denoiser has none: hosts pass their step's).
    grad_batch: images per backward pass (peak memory grows with it). should_stop: polled between model
    calls; when it says True, memoguard.model.Interrupted is raised.
    """
    if check_method(method) == "auto":
        method = default_method(model, cond)
    batch = cond.embedding.shape[0]
    if x_T.shape[0] % batch:
        raise ExplanationError(f"x_T has {x_T.shape[0]} images, not a multiple of {batch} prompts")
    gens = x_T.shape[0] // batch
    if not 1 <= steps <= total_steps:
        raise ExplanationError(f"steps must be in [1, {total_steps}], got {steps}")
    if min(ig_steps, batch_size, grad_batch) < 1:
        raise ExplanationError(f"ig_steps, batch_size and grad_batch must be >= 1 (got {ig_steps}, {batch_size}, "
                               f"{grad_batch})")
    cond = cond.with_embedding(cond.embedding.detach())
    cond_g = cond.repeat_rows(gens)
    reencode = None
    if method == "leave_one_out" and _reencodes(model, cond):
        reencode = cond
    label = method if method != "leave_one_out" or reencode is not None else "leave_one_out_embedding"
    empty = _reference(uncond.embedding.detach(), cond_g.embedding.shape[1]).to(cond_g.embedding)
    prompt_rows = [[i for i, keep in enumerate(row) if keep] for row in cond_g.prompt_mask.tolist()]
    if timesteps is None and not isinstance(model, DiffusionModel):
        raise ExplanationError(f"{type(model).__name__} has no schedule of its own: pass the step's timesteps")
    ts = model.timesteps(total_steps) if timesteps is None else timesteps
    if len(ts) < steps:
        raise ExplanationError(f"steps ({steps}) exceeds the {len(ts)} timesteps given")
    if steps > 1 and guidance is None:
        guidance = model.guidance  # between explained steps the core samples: a DiffusionModel's own scale
    x = x_T
    totals = torch.zeros(cond_g.embedding.shape[:2])
    for i in range(steps):
        totals += _attribute(method, model, x, ts[i], cond_g, uncond, empty, prompt_rows, ig_steps, batch_size,
                             gens, reencode, grad_batch, should_stop)
        if i + 1 < steps:
            with torch.no_grad():
                eps_c, eps_u = model.eps_pair(x, ts[i], cond_g, uncond)
                eps = eps_u + guidance * (eps_c - eps_u)
                x = ddim_step(x, eps, model.coefficients(ts[i]), model.coefficients(ts[i + 1]))
    totals = (totals / steps).reshape(batch, gens, -1).mean(dim=1)
    out = []
    for b in range(batch):
        positions = [i for i, keep in enumerate(cond.prompt_mask[b].tolist()) if keep]
        out.append(TokenContributions([cond.tokens[b][i] for i in positions],
                                      [float(totals[b, i]) for i in positions], positions, label))
    return out
