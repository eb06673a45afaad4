"""Word-wise significance: which words make the model regurgitate.

All methods attribute the verdict's score in its raw L2 form, gap = ||D(eps(x_t, e) - eps(x_t, e_empty))||_2
(D: the identity for the paper's magnitude, the detail for memoguard.score's default detector), to the words of
the prompt — a word's BPE pieces together where the adapter's tokenizer marks word ends
(PromptEncoding.words), else each token — averaged over the first `steps` sampling steps and over
generations; between steps the generation follows ordinary guided DDIM.
  - "gradient_norm":        ||d gap / d e_w||_2 over the word's positions (Wen et al., Sec. 4, the
                            paper's method). Says how sensitive the gap is, not what removing the word does.
  - "gradient_x_delta":     d gap / d e . (e - e_empty) summed over the word's positions: the first-order
                            change of the gap when they are set to the empty prompt's output there.
  - "integrated_gradients": the same product along the straight path from e_empty to e
                            (`ig_steps` gradients); the scores add up to the gap.
  - "leave_one_out":        gap(e) - gap(prompt without word w), one batched forward per word. Where the
                            adapter can re-encode (DiffusionModel.encode_without) the prompt is encoded
                            again without the word: the sound removal for a causal text encoder (CLIP),
                            which writes each token into every later position. Elsewhere, and as
                            "leave_one_out_embedding", the word's positions alone take the empty
                            prompt's output, which leaves the word in the later positions.
  - "leave_one_out_screened": leave-one-out for long prompts (re-encoded) on the SCREENED_WORDS words whose
                            removal a first-order estimate says lowers the gap most: the prompt is re-encoded
                            without each word (text encoder only), and d gap / d e . (e_without - e) over
                            every position estimates each removal's effect, later positions' shift included
                            (2 + a backward + 12 evaluations a step at any length).
  - "leave_one_out_grouped": group testing for long prompts (re-encoded), with no backward pass (for a model
                            whose backward does not fit beside it): parts of the words are left out in turn,
                            the part whose removal lowers the gap most is kept, until a few words remain,
                            which are then left out one by one (14 evaluations at 75 words).
The leave-one-out and gradient x input scores are signed (negative: the word lowers the gap); shares count
positive scores only. Leave-one-out also tells the score with a word left out, so an explanation can say
that no single word ends the recall (TokenContributions.summary).
Default (`default_method`): exact leave-one-out where the adapter re-encodes and the prompt has at most
LEAVE_ONE_OUT_MAX_WORDS words, screened leave-one-out for longer ones; gradient x input where the adapter
cannot re-encode (the hosts). Leave-one-out in the embedding depends on what the host's empty prompt holds
at each position: in the real ComfyUI (which pads with EOS) emptying any one position raised the score of a
memorized prompt, so it is an option, not a default. `bench` measures all of them on both evaluation
models (BENCHMARKS.md).
"""
from dataclasses import dataclass
from functools import partial
from typing import Callable, List, Optional, Sequence

import torch

from .errors import MemoGuardError
from .model import Denoiser, DiffusionModel, PromptEncoding, ddim_step, gap_gradients, in_batches, rows_of_t
from .score import DEFAULT_DETECTOR, check_step_detector, raw_step_score

METHODS = ("auto", "leave_one_out", "leave_one_out_screened", "leave_one_out_grouped", "leave_one_out_embedding",
           "gradient_x_delta", "integrated_gradients", "gradient_norm")
METHOD_NAMES = {"leave_one_out": "leave-one-out", "leave_one_out_screened": "leave-one-out of the likeliest words",
                "leave_one_out_grouped": "leave-one-out in the part that matters",
                "leave_one_out_embedding": "leave-one-out (embedding)", "gradient_x_delta": "gradient x input",
                "integrated_gradients": "integrated gradients", "gradient_norm": "gradient norm (paper)"}
MEASURES_REMOVAL = ("leave_one_out", "leave_one_out_screened", "leave_one_out_grouped", "leave_one_out_embedding")
# re-encode the prompt where the adapter can
REENCODED_METHODS = ("auto", "leave_one_out", "leave_one_out_screened", "leave_one_out_grouped")
SCREENED_WORDS = 12  # screened: words measured exactly, 2 + a backward (2) + 12 = 16 evaluations a step
GROUPS, GROUPED_WORDS = 4, 4  # grouped: parts a round splits the words in play into, until this many remain
LEAVE_ONE_OUT_MAX_WORDS = 12  # exact: n + 2 evaluations a step, up to 12 words less than the screen's 16

class ExplanationError(MemoGuardError, ValueError):
    """Settings of an explanation that cannot work."""


@dataclass
class TokenContributions:
    """Per-word scores of one prompt (BOS/EOS/padding left out). A word is its BPE pieces together where the
    adapter's tokenizer marks word ends (memoguard.model.PromptEncoding.words), else one token."""
    tokens: List[str]            # each word's text (its pieces joined)
    scores: List[float]          # the method's scores, averaged over steps and generations
    positions: List[int]         # index of each word's first piece in the (possibly multi-chunk) embedding
    method: str = "gradient_norm"
    groups: Optional[List[List[int]]] = None  # every position of each word (None: `positions` alone)
    gap_before: Optional[float] = None        # the prompt's L2 gap, averaged like the scores
    elements: int = 0                         # values per image (RMS = L2 / sqrt(elements))
    measured: Optional[List[bool]] = None     # which words leave-one-out measured (grouped: the part it narrowed to)

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

    def score_without(self, i: int) -> Optional[float]:
        """The first-step score (RMS) with word i left out, where the method measured it (leave-one-out), else None."""
        if self.method not in MEASURES_REMOVAL or self.gap_before is None or not self.elements:
            return None
        if self.measured is not None and not self.measured[i]:
            return None
        return (self.gap_before - self.scores[i]) / self.elements ** 0.5

    def single_word_ends(self, threshold: float) -> Optional[bool]:
        """Whether leaving out one word brings the score under `threshold`; None where the method cannot tell."""
        after = [a for a in (self.score_without(i) for i in range(len(self.tokens))) if a is not None]
        return None if not after else min(after) < threshold

    def summary(self, threshold: Optional[float] = None, k: int = 3) -> str:
        """The line users read: the top words with their shares, or, where leave-one-out shows that no single word
        brings the score under the threshold, that the recall is spread over the caption."""
        if threshold is not None and self.single_word_ends(threshold) is False:
            best = self.ranking()[0]
            return (f"spread over the caption: no single word ends the recall (without {self.tokens[best]!r} the "
                    f"score is {self.score_without(best):.4f}, threshold {threshold:.4f})")
        return f"top words ({self.method_name}): " + ", ".join(f"{t} {100 * s:.0f}%" for t, s in self.top(k))

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "scores": self.scores, "shares": self.shares, "positions": self.positions,
                "groups": self.groups, "method": self.method, "method_name": self.method_name,
                "score_without": [self.score_without(i) for i in range(len(self.tokens))]}


def average_contributions(runs: List[TokenContributions]) -> Optional[TokenContributions]:
    """One prompt's contributions averaged over runs (steps, images) of the same words."""
    if not runs:
        return None
    first = runs[0]
    if any(r.tokens != first.tokens or r.method != first.method for r in runs):
        raise ExplanationError("cannot average contributions of different prompts or methods")
    scores = [sum(r.scores[i] for r in runs) / len(runs) for i in range(len(first.scores))]
    gaps = [r.gap_before for r in runs]
    gap = None if any(g is None for g in gaps) else sum(gaps) / len(gaps)
    measured = None if first.measured is None else [all(r.measured[i] for r in runs) for i in range(len(scores))]
    return TokenContributions(first.tokens, scores, first.positions, first.method, first.groups, gap, first.elements,
                              measured)


def _reference(uncond_embedding: torch.Tensor, length: int) -> torch.Tensor:
    """The unconditional prompt's output at each of the prompt's `length` positions (a shorter one repeats, as the
    hosts repeat it for CFG; a longer negative prompt contributes its first positions)."""
    repeats = -(-length // uncond_embedding.shape[1])
    return uncond_embedding.repeat(1, repeats, 1)[:, :length]


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ExplanationError(f"explanation method must be one of {', '.join(METHODS)}; got {method!r}")
    return method


def default_method(model: Denoiser, cond: PromptEncoding) -> str:
    """Leave-one-out where the adapter re-encodes (exact for short prompts, on the screened words of long ones);
    gradient x input where it cannot."""
    if not model.can_reencode(cond):
        return "gradient_x_delta"
    longest = max((len(cond.word_groups(b)) for b in range(cond.embedding.shape[0])), default=0)
    return "leave_one_out" if longest <= LEAVE_ONE_OUT_MAX_WORDS else "leave_one_out_screened"


def _unit_sums(per_position: torch.Tensor, units) -> List[torch.Tensor]:
    """(B, L) scores -> per row, the sum over each word's positions."""
    return [torch.stack([per_position[b, g].sum() for g in row]) if row else torch.zeros(0)
            for b, row in enumerate(units)]


def _leave_one_out(model, x, t, cond, uncond, empty, units, batch_size, gens, reencode, should_stop, gap_of,
                   only=None, eps_u=None, base=None):
    """Per row, the gap drop when each word is left out (re-encoded, or its positions emptied); `only`: per row,
    the word indices to measure (the others score 0); eps_u and base: the unconditional prediction and the gap
    (B,) where the caller has them. Returns (drops per row, base gap (B,))."""
    emb = cond.embedding
    with torch.no_grad():
        if eps_u is None:  # one unconditional pass serves every edit
            eps_u = model.eps_uncond(x, t, uncond, emb.shape[1])
        if base is None:
            base = gap_of(model.eps(x, t, emb, cond.extra) - eps_u).float().cpu()
        out = [torch.zeros(len(row)) for row in units]
        jobs = [(b, k) for b, row in enumerate(units) for k in range(len(row)) if only is None or k in only[b]]

        def run(part):
            rows = torch.tensor([b for b, _ in part])
            if reencode is not None:  # cond row b holds prompt b // gens
                sub = model.encode_without(reencode, [(b // gens, units[b][k]) for b, k in part])
                sub = sub.with_embedding(sub.embedding.to(emb))
            else:
                sub = cond.rows(rows)
                edited = sub.embedding.clone()
                for j, (b, k) in enumerate(part):
                    edited[j, units[b][k]] = empty[0, units[b][k]]
                sub = sub.with_embedding(edited)
            index = rows.to(x.device)
            gaps = gap_of(model.eps(x[index], rows_of_t(t, rows.tolist()), sub.embedding, sub.extra)
                          - eps_u[index]).float().cpu()
            for j, (b, k) in enumerate(part):
                out[b][k] = base[b] - gaps[j]

        in_batches(jobs, batch_size, run, should_stop)
    return out, base


def _screened(model, x, t, cond, uncond, units, batch_size, gens, reencode, grad_batch, should_stop, gap_of):
    """Leave-one-out on each prompt's SCREENED_WORDS words whose removal lowers the gap most by a first-order
    estimate: gradient of the gap at the prompt's embedding . (the prompt re-encoded without the word - the prompt),
    summed over the prompt's generations, so that all of them measure the same words. Prompts of at most
    SCREENED_WORDS words skip the gradient (every word is measured). Returns (drops, base, measured)."""
    with torch.no_grad():
        eps_u = model.eps_uncond(x, t, uncond, cond.embedding.shape[1])
    long = [p for p in range(reencode.embedding.shape[0]) if len(units[p * gens]) > SCREENED_WORDS]
    if long:
        weight = torch.tensor([float(b // gens in long) for b in range(x.shape[0])])  # 0: no backward for that image
        base, grad = gap_gradients(model, x, t, cond, eps_u, cond.embedding, gap_of=gap_of, weight=weight,
                                   grad_batch=grad_batch, should_stop=should_stop)
    else:
        with torch.no_grad():
            base = gap_of(model.eps(x, t, cond.embedding, cond.extra) - eps_u).float().cpu()
    only = [set(range(len(row))) for row in units]
    for p in long:
        words = units[p * gens]
        slope = grad[p * gens:(p + 1) * gens].sum(0)
        estimate = torch.zeros(len(words))

        def run(part):
            sub = model.encode_without(reencode, [(p, words[k]) for k in part])
            change = sub.embedding.to(slope) - reencode.embedding[p:p + 1].to(slope)
            estimate[list(part)] = -(change * slope).sum((1, 2)).cpu()  # the gap's first-order drop

        in_batches(range(len(words)), batch_size, run, should_stop)
        chosen = set(torch.argsort(estimate, descending=True, stable=True)[:SCREENED_WORDS].tolist())
        only[p * gens:(p + 1) * gens] = [chosen] * gens
    drops, _ = _leave_one_out(model, x, t, cond, uncond, None, units, batch_size, gens, reencode, should_stop, gap_of,
                              only=only, eps_u=eps_u, base=base)
    return drops, base, [torch.tensor([k in w for k in range(len(row))]) for w, row in zip(only, units)]


def _grouped(model, x, t, cond, uncond, units, batch_size, gens, reencode, should_stop, gap_of):
    """Group testing: split the words into GROUPS contiguous parts, leave each part out (re-encoded), keep the part
    whose removal lowers the gap most, repeat until at most GROUPED_WORDS words remain, then leave each of them out
    alone. 2 + GROUPS a round + the words left, a step (75 words: 2 + 4 + 4 + 4 = 14). Returns (drops, base,
    measured)."""
    with torch.no_grad():
        eps_u = model.eps_uncond(x, t, uncond, cond.embedding.shape[1])
        base = gap_of(model.eps(x, t, cond.embedding, cond.extra) - eps_u).float().cpu()
        left = [list(range(len(row))) for row in units]  # per row, the word indices still in play
        while any(len(w) > GROUPED_WORDS for w in left):
            parts = {b: [w[k * len(w) // GROUPS:(k + 1) * len(w) // GROUPS] for k in range(GROUPS)]
                     for b, w in enumerate(left) if len(w) > GROUPED_WORDS}
            jobs = [(b, part) for b, ps in parts.items() for part in ps]
            gaps = []

            def run(chunk):
                sub = model.encode_without(reencode, [(b // gens, [i for k in part for i in units[b][k]])
                                                      for b, part in chunk])
                index = torch.tensor([b for b, _ in chunk], device=x.device)
                gaps.extend(gap_of(model.eps(x[index], rows_of_t(t, [b for b, _ in chunk]),
                                           sub.embedding.to(cond.embedding), sub.extra)
                                   - eps_u[index]).float().cpu().tolist())

            in_batches(jobs, batch_size, run, should_stop)
            for b in parts:
                options = [(g, part) for (row, part), g in zip(jobs, gaps) if row == b]
                left[b] = min(options, key=lambda o: o[0])[1]
    drops, _ = _leave_one_out(model, x, t, cond, uncond, None, units, batch_size, gens, reencode, should_stop, gap_of,
                              only=[set(w) for w in left], eps_u=eps_u, base=base)
    return drops, base, [torch.tensor([k in set(w) for k in range(len(row))]) for w, row in zip(left, units)]


def _attribute(method, model, x, t, cond, uncond, empty, units, ig_steps, batch_size, gens, reencode,
               grad_batch, should_stop, gap_of):
    """(per row, one score per word; base gap per row (B,); per row, which words were measured, or None: all)."""
    emb = cond.embedding
    if method == "leave_one_out_screened":
        return _screened(model, x, t, cond, uncond, units, batch_size, gens, reencode, grad_batch, should_stop, gap_of)
    if method == "leave_one_out_grouped":
        return _grouped(model, x, t, cond, uncond, units, batch_size, gens, reencode, should_stop, gap_of)
    if method in ("leave_one_out", "leave_one_out_embedding"):
        return (*_leave_one_out(model, x, t, cond, uncond, empty, units, batch_size, gens, reencode, should_stop,
                                gap_of), None)
    with torch.no_grad():  # the uncond pass needs no gradient: computed once, apart
        eps_u = model.eps_uncond(x, t, uncond, emb.shape[1])
    gradient = lambda e: gap_gradients(model, x, t, cond, eps_u, e, gap_of=gap_of, grad_batch=grad_batch,
                                       should_stop=should_stop)
    if method == "gradient_norm":
        base, grad = gradient(emb)
        return [torch.stack([grad[b, g].norm() for g in row]).cpu() if row else torch.zeros(0)
                for b, row in enumerate(units)], base, None
    delta = (emb - empty).float()
    if method == "gradient_x_delta":
        base, grad = gradient(emb)
    else:  # integrated gradients, midpoint rule on the path e_empty -> e
        base = gradient(emb)[0]
        grad = sum(gradient(empty + (k + 0.5) / ig_steps * (emb - empty))[1] for k in range(ig_steps)) / ig_steps
    return _unit_sums((grad * delta).sum(dim=-1).cpu(), units), base, None


def token_contributions(model: Denoiser, cond: PromptEncoding, uncond: PromptEncoding,
                        x_T: torch.Tensor, steps: int = 1, guidance: Optional[float] = None,
                        total_steps: int = 50, method: str = "auto", ig_steps: int = 4,
                        batch_size: int = 16, timesteps: Optional[Sequence] = None, grad_batch: int = 1,
                        should_stop: Optional[Callable[[], bool]] = None,
                        detector: str = DEFAULT_DETECTOR) -> List[TokenContributions]:
    """Contributions of each word of each prompt of `cond` to the first steps' score by `detector`
    (memoguard.score.STEP_DETECTORS: the verdict's); x_T is (B * generations, ...) laid out prompt-major.

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
    gap_of = partial(raw_step_score, detector=check_step_detector(detector))
    cond = cond.with_embedding(cond.embedding.detach())
    cond_g = cond.repeat_rows(gens)
    reencodes = model.can_reencode(cond)
    if method in ("leave_one_out_screened", "leave_one_out_grouped") and not reencodes:
        raise ExplanationError(f"{METHOD_NAMES[method]} re-encodes the prompt, which {type(model).__name__} cannot do")
    reencode = cond if method in REENCODED_METHODS and reencodes else None
    label = method if method != "leave_one_out" or reencode is not None else "leave_one_out_embedding"
    empty = _reference(uncond.embedding.detach(), cond_g.embedding.shape[1]).to(cond_g.embedding)
    units = [cond_g.word_groups(b) for b in range(cond_g.embedding.shape[0])]
    if timesteps is None and not isinstance(model, DiffusionModel):
        raise ExplanationError(f"{type(model).__name__} has no schedule of its own: pass the step's timesteps")
    ts = model.timesteps(total_steps) if timesteps is None else timesteps
    if len(ts) < steps:
        raise ExplanationError(f"steps ({steps}) exceeds the {len(ts)} timesteps given")
    if steps > 1 and guidance is None:
        guidance = model.guidance  # between explained steps the core samples: a DiffusionModel's own scale
    x = x_T
    totals = [torch.zeros(len(row)) for row in units]
    measured = [torch.ones(len(row), dtype=torch.bool) for row in units]
    base = torch.zeros(cond_g.embedding.shape[0])
    for i in range(steps):
        scores, gap, step_measured = _attribute(label, model, x, ts[i], cond_g, uncond, empty, units, ig_steps,
                                                batch_size, gens, reencode, grad_batch, should_stop, gap_of)
        totals = [a + s for a, s in zip(totals, scores)]
        if step_measured is not None:
            measured = [m & n for m, n in zip(measured, step_measured)]
        base += gap
        if i + 1 < steps:
            with torch.no_grad():
                eps_c, eps_u = model.eps_pair(x, ts[i], cond_g, uncond)
                eps = eps_u + guidance * (eps_c - eps_u)
                x = ddim_step(x, eps, model.coefficients(ts[i]), model.coefficients(ts[i + 1]))
    out = []
    for b in range(batch):
        rows = range(b * gens, (b + 1) * gens)  # one prompt's generations share its words
        scores = sum(totals[r] for r in rows) / (steps * gens)
        groups = units[b * gens]
        known = torch.stack([measured[r] for r in rows]).all(0).tolist() if groups else []
        out.append(TokenContributions(["".join(cond.tokens[b][i] for i in g) for g in groups],
                                      [float(v) for v in scores], [g[0] for g in groups], label, groups,
                                      float(base[list(rows)].mean()) / steps, x_T[0].numel(), known))
    return out
