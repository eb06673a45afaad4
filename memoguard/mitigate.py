"""Inference-time mitigation: steer a generation away from a memorized image before it forms.

Seven strategies, measured side by side by `bench` on both evaluation models (BENCHMARKS.md):
  - "remove_tokens": leave out, one word at a time (a word's BPE pieces together), the word whose
    removal brings the first-step score under `target` with the smallest drop (the least edit that
    ends the recall; the largest drop while none reaches it), at most `max_removals` words. The first
    round tries up to `max_candidates` words (one first-step forward each, no backward pass; a longer
    prompt's candidates are its top words by gradient x input, one forward + backward), each later round
    the `later_candidates` that came next in the round before. Needs an adapter that re-encodes
    prompts (Denoiser.can_reencode).
  - "minimize" (Wen et al., Sec. 5, the paper's): AdamW on the conditional prompt embedding (every
    BOS frozen, uncond fixed), loss = RMS gap at the first step on the very x_T the generation then
    starts from; stop once every image is at or under `target`. The embedding then serves every step.
  - "guidance_delay": text guidance off for the first `delay` share of the steps, then the run's own
    scale (after Jain et al., arXiv 2411.16738: memorized images are attractors of the guided
    trajectory early on). No extra model call; the first-step score is unchanged.
  - "opposite_guidance" (Jain et al.'s own proposal): the same first steps guided *away* from the
    prompt at scale `early_scale` (< 0), pushing the trajectory out of the attraction basin.
  - "new_noise" (after Jeon et al., SAIL, arXiv 2412.04140: the initial noise decides whether a
    memorized prompt recalls): up to `noise_candidates` fresh initial noises, each scored at the
    first step (one guided pair), the first under `target` kept, else the lowest. The prompt is kept.
    A candidate is the noise of a recorded seed, so the image can be made again.
  - "optimize_noise" (Jeon et al.'s SAIL, arXiv 2412.04140, Algorithm 2): Adam on the initial noise itself,
    loss = the guidance difference's L2 norm at the noise moved one unit along that difference (their
    sharpness proxy) + SAIL_GAUSSIAN_WEIGHT x the noise's norm (keeps it a plausible Gaussian draw), at most
    `max_iters` steps of `lr` (the paper's 10 and 0.05); an image keeps the first noise whose first-step score
    is under `target`, else its lowest. The prompt and guidance are kept; the noise is a deterministic function
    of the seed's noise, the prompt and the settings.
  - "mask_padding" (after Kim & No, arXiv 2605.02908: CLIP pads with copies of the end-of-text token,
    and those copies drive the recall): the padding positions' embeddings, the `pad_share` of them
    nearest the end-of-text first, set to zero (each chunk's BOS, prompt tokens and end-of-text kept).
    The words stay and nothing is re-encoded: it needs only where the prompt's words end (the
    encoding's prompt_mask, from the host's tokenizer). One extra forward pass measures the score
    after. Zeroing is this project's form of the paper's "masking".
A prompt strategy can be followed by a schedule ("remove_tokens+guidance_delay", "new_noise+
opposite_guidance"): the schedule then applies to the images the first one changed.
Every strategy leaves images at or under `target` untouched, and mode "auto" touches only images
whose first-step score is at or above `threshold`. Defaults (the best measured on both evaluation
models): DEFAULT_STRATEGY where the prompt's tokens are known, DEFAULT_WITHOUT_PROMPT where not.
"""
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, List, Optional, Sequence

import torch

from .errors import MemoGuardError
from .model import CHUNK, Denoiser, DiffusionModel, PromptEncoding, check_stop, gap_gradients, in_batches, rows_of_t
from .score import DEFAULT_DETECTOR, step_score

MODES = ("off", "always", "auto")
DEFAULT_DELAY = 0.3  # the best measured delay (BENCHMARKS.md, mitigation table)
# opposite guidance's first steps and their scale: of the rows measured (BENCHMARKS.md, mitigation on both models),
# 0.2 of the steps at -3 left the fewest copies on both evaluation models
OPPOSITE_DELAY, DEFAULT_EARLY_SCALE = 0.2, -3.0
DEFAULT_NOISE_CANDIDATES = 4
SEED_STRIDE = 1_000_003     # candidate k of seed s is seed s + k * SEED_STRIDE: never a batch neighbour's seed
STARTS = ("remove_tokens", "minimize", "new_noise", "optimize_noise", "mask_padding")
# SAIL's weight of the noise's norm for SD1 (raw L2 norms both: their ratio does not depend on the latent's size)
SAIL_GAUSSIAN_WEIGHT = 0.05
DEFAULT_PAD_SHARE = 1.0
SCHEDULES = ("guidance_delay", "opposite_guidance")
STRATEGIES = STARTS + SCHEDULES + tuple(f"{a}+{b}" for a in ("remove_tokens", "new_noise", "mask_padding")
                                        for b in SCHEDULES)
# the defaults, the best measured on both evaluation models (BENCHMARKS.md, mitigation on both models): padding
# masking meets the alignment and model-call targets on both and leaves the fewest copies of those that do; where a
# host knows neither the prompt's tokens nor its text, opposite guidance leaves the fewest of the schedules
DEFAULT_STRATEGY = "mask_padding"
DEFAULT_WITHOUT_PROMPT = "opposite_guidance"
# where the prompt's positions have no CLIP chunk padded with its end token (Flux's, Chroma's T5, Qwen-Image's LLM),
# nothing is padding to mask; token removal re-encodes the prompt without its words (SD3 masks its CLIP chunk: on
# the flow evaluation model that keeps the stated attributes, token removal stops more copies, BENCHMARKS.md)
DEFAULT_WITHOUT_PADDING = "remove_tokens"
PADDING_PREMISE = ("padding masking zeroes a CLIP's padding (copies of its end token); this model's prompt positions "
                   "have no CLIP chunk (T5 or an LLM alone)")
PADDED_NOTE = "padded to the prompt's length, as in a batch: typed alone it gives another image"
STRATEGY_NAMES = {"remove_tokens": "token removal", "minimize": "embedding minimization (paper)",
                  "guidance_delay": "delayed guidance", "opposite_guidance": "opposite guidance",
                  "new_noise": "new initial noise", "optimize_noise": "optimized initial noise (SAIL)",
                  "mask_padding": "padding masked"}


class MitigationError(MemoGuardError, ValueError):
    """Mitigation settings that cannot work, or a strategy the model cannot run."""


@dataclass
class MitigationRecord:
    mode: str
    ran: bool
    iterations: int = 0                                       # AdamW steps / removal rounds for the batch
    image_iterations: List[int] = field(default_factory=list)  # steps each image actually moved
    losses: List[List[float]] = field(default_factory=list)  # per iteration, per image (RMS gap)
    before: List[float] = field(default_factory=list)         # first-step RMS gap per image
    after: List[float] = field(default_factory=list)
    reason: str = ""
    strategy: str = "minimize"
    removed: List[List[str]] = field(default_factory=list)    # remove_tokens: words left out, per image
    # remove_tokens: the shorter prompt padded to the prompt's length (a batch's padding), per image: the prompt
    # typed without the words gives another image (memoguard.model.fit_shorter_prompt)
    padded: List[bool] = field(default_factory=list)
    delay_steps: int = 0                                      # schedules: steps at early_scale
    early_scale: float = 0.0                                  # schedules: scale of those steps (0: no guidance)
    seeds: List[Optional[int]] = field(default_factory=list)  # new_noise: the seed of each image's new noise
    masked: List[int] = field(default_factory=list)           # mask_padding: positions zeroed, per image
    passes: float = 0.0  # model evaluations per image on top of sampling (a backward counts as 2)
    threshold: Optional[float] = None                         # auto: images scoring under it are left alone
    target: float = 0.0                                       # images at or under it are left alone

    @property
    def strategy_name(self) -> str:
        return " + ".join(STRATEGY_NAMES[part] for part in self.strategy.split("+"))

    def summary(self, image: int = 0) -> str:
        """One line for image `image`, as the hosts and the CLI show it."""
        if not self.ran:
            return f"{self.strategy_name}: not run ({self.reason})"
        moved = self.image_iterations[image] if image < len(self.image_iterations) else 0
        if not moved:
            return f"{self.strategy_name}: not needed for this image ({self.left_alone(image)})"
        start, _, schedule = self.strategy.partition("+")
        if start in SCHEDULES:
            return f"{self.strategy_name}: {self._schedule_text()}"
        what = {"remove_tokens": lambda: f"removed {', '.join(repr(t) for t in self.removed[image]) or 'nothing'}",
                "new_noise": lambda: f"seed {self.seeds[image]}" if self.seeds[image] is not None else "noise kept",
                "minimize": lambda: f"{moved} iterations",
                "optimize_noise": lambda: f"noise optimized for {moved} steps",
                "mask_padding": lambda: f"{self.masked[image]} padding positions zeroed"}[start]()
        then = f"; then {self._schedule_text()}" if schedule else ""
        padded = f"; {PADDED_NOTE}" if start == "remove_tokens" and self.is_padded(image) else ""
        return (f"{self.strategy_name}: {what}, first-step score {self.before[image]:.4f} -> "
                f"{self.after[image]:.4f}{padded}{then}")

    def is_padded(self, image: int) -> bool:
        return image < len(self.padded) and self.padded[image]

    def _schedule_text(self) -> str:
        if self.early_scale == 0:
            return f"no text guidance for the first {self.delay_steps} steps"
        return f"guidance {self.early_scale:g} (away from the prompt) for the first {self.delay_steps} steps"

    def left_alone(self, image: int) -> str:
        """Why an image was not changed: its first-step score against the bound it did not pass."""
        score = self.before[image]
        if self.mode == "auto" and self.threshold is not None and not score >= self.threshold:
            return f"first-step score {score:.4f} under the threshold {self.threshold:.4f}"
        return f"first-step score {score:.4f} already at or under the target {self.target:.4f}"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def check_mode(mode: str, target: float) -> None:
    """The settings every strategy shares."""
    if mode not in MODES:
        raise MitigationError(f"mitigation mode must be one of {MODES}, got {mode!r}")
    if not target >= 0:
        raise MitigationError(f"need target >= 0 (got {target})")


def check_settings(mode: str, lr: float, max_iters: int, target: float) -> None:
    """The shared settings and the minimization's own."""
    check_mode(mode, target)
    if not (lr > 0) or max_iters < 0:
        raise MitigationError(f"need lr > 0, max_iters >= 0 (got {lr}, {max_iters})")


def check_strategy(strategy: str) -> str:
    """A known strategy name (a start, a schedule, or a start + a schedule)."""
    if strategy not in STRATEGIES:
        raise MitigationError(f"mitigation strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    return strategy


def host_strategy(knows_prompt: bool) -> str:
    """A host's "auto" strategy: the default where it knows the prompt's tokens, else the best schedule."""
    return DEFAULT_STRATEGY if knows_prompt else DEFAULT_WITHOUT_PROMPT


def extra_cost(record: MitigationRecord, steps: int) -> float:
    """Sampling time with this mitigation / without, where the model call dominates (SD sizes): a guided
    step is two evaluations per image."""
    return 1 + record.passes / (2 * steps)


def _first_step(model, cond, uncond, x_T, t_first, detector):
    """(uncond eps, score per image) at the first step; the uncond pass serves every later evaluation."""
    with torch.no_grad():
        eps_u = model.eps_uncond(x_T, t_first, uncond, cond.embedding.shape[1])
        gap = step_score(model.eps(x_T, t_first, cond.embedding.detach(), cond.extra) - eps_u,
                         detector).float().cpu()
    return eps_u, gap


def _start(model, cond, uncond, x_T, t_first, mode, threshold, target, strategy, detector, first_step=None):
    """The first-step scores, the record, and which images to work on (None: nothing to do). first_step: (eps_u,
    score per image) at (x_T, t_first) where the caller has scored that step already (a host's own check)."""
    eps_u, gap = _first_step(model, cond, uncond, x_T, t_first, detector) if first_step is None else first_step
    record, active = decide(gap, mode, threshold, target, strategy)
    return eps_u, gap, record, active


def decide(gap: torch.Tensor, mode: str, threshold: Optional[float], target: float, strategy: str):
    """(record, which images to mitigate (B,) bool, or None for none) from the first-step scores (B,)."""
    gap = gap.detach().float().cpu()
    batch = gap.shape[0]
    record = MitigationRecord(mode=mode, ran=False, before=gap.tolist(), after=gap.tolist(),
                              image_iterations=[0] * batch, strategy=strategy, removed=[[] for _ in range(batch)],
                              seeds=[None] * batch, masked=[0] * batch, passes=0.0 if strategy in SCHEDULES else 2.0,
                              threshold=threshold, target=float(target))
    if mode == "off":
        record.reason = "mitigation off"
        return record, None
    active = torch.isfinite(gap) & (gap > target)
    if mode == "auto":
        if threshold is None:
            raise MitigationError("mode 'auto' needs a threshold (from a calibration)")
        flagged = gap >= threshold
        if not bool(flagged.any()):
            record.reason = f"first-step score under threshold {threshold:.4g}"
            return record, None
        active &= flagged
    if not bool(active.any()):
        record.reason = f"first-step score already at or under target {target:.4g}"
        return record, None
    record.ran = True
    return record, active


def minimize_embedding(model: Denoiser, cond: PromptEncoding, uncond: PromptEncoding,
                       x_T: torch.Tensor, t_first, *, mode: str = "always", threshold: Optional[float] = None,
                       target: float = 0.0, lr: float = 0.05, max_iters: int = 10, grad_batch: int = 1,
                       should_stop: Optional[Callable[[], bool]] = None, first_step=None,
                       detector: str = DEFAULT_DETECTOR):
    """The paper's strategy. Returns (embedding to sample with, MitigationRecord). mode "auto" needs `threshold`.

    cond must hold one prompt per image of x_T. Images already at or under `target` stop moving
    (their rows are restored after each AdamW step), so one image never pays for another.
    grad_batch: images per backward pass (peak memory grows with it; the result does not depend on it).
    should_stop: polled before every model call; True raises memoguard.model.Interrupted.
    first_step: (unconditional eps, score per image) at (x_T, t_first) where the caller has them (a host that
    scored the step to decide): not evaluated again. The same in remove_tokens and mask_padding.
    detector: the score every strategy reads, decides by and lowers (memoguard.score.STEP_DETECTORS; the verdict's,
    so that threshold and target are in its units).
    """
    check_settings(mode, lr, max_iters, target)
    if grad_batch < 1:
        raise MitigationError(f"grad_batch must be >= 1, got {grad_batch}")
    check_stop(should_stop)
    emb0 = cond.embedding.detach()
    eps_u, gap, record, active = _start(model, cond, uncond, x_T, t_first, mode, threshold, target, "minimize",
                                        detector, first_step)
    if active is None:
        return emb0, record
    frozen_positions = cond.frozen_mask.to(emb0.device).unsqueeze(-1)
    emb = emb0.clone().float().requires_grad_(True)
    opt = torch.optim.AdamW([emb], lr=lr)
    step = lambda weight: gap_gradients(model, x_T, t_first, cond, eps_u, emb.detach().to(emb0.dtype),
                                        gap_of=partial(step_score, detector=detector), weight=weight, grad_batch=grad_batch,
                                        should_stop=should_stop)
    for _ in range(max_iters):
        gap, grad = step(active.float())
        record.losses.append(gap.tolist())
        active &= gap > target
        if not bool(active.any()):
            break
        # the gradient of an image that reached the target this iteration is not applied
        emb.grad = grad * active.to(grad.device).reshape(-1, 1, 1)
        held = emb.detach().clone()
        opt.step()
        with torch.no_grad():  # BOS never moves; images already at target keep their embedding
            moving = active.to(emb0.device).reshape(-1, 1, 1) & ~frozen_positions
            emb.data = torch.where(moving, emb.data, torch.where(frozen_positions, emb0.float(), held))
        record.iterations += 1
        record.image_iterations = [n + int(a) for n, a in zip(record.image_iterations, active.tolist())]
        record.passes += 3  # forward + backward for the whole batch
    else:  # ran out of iterations: measure where the last step landed
        gap, _ = step(torch.zeros_like(active, dtype=torch.float32))
        record.passes += 1
    record.after = gap.tolist()
    return emb.detach().to(emb0.dtype), record


def remove_tokens(model: DiffusionModel, cond: PromptEncoding, uncond: PromptEncoding, x_T: torch.Tensor,
                  t_first, *, mode: str = "always", threshold: Optional[float] = None, target: float = 0.0,
                  max_removals: int = 3, max_candidates: int = 8, later_candidates: int = 2,
                  batch_size: int = 16, should_stop: Optional[Callable[[], bool]] = None, first_step=None,
                  detector: str = DEFAULT_DETECTOR):
    """Returns (PromptEncoding to sample with, MitigationRecord); one prompt row per image of x_T."""
    check_mode(mode, target)
    if min(max_removals, max_candidates, later_candidates) < 1:
        raise MitigationError(f"max_removals, max_candidates and later_candidates must be >= 1 (got {max_removals}, "
                              f"{max_candidates}, {later_candidates})")
    if not model.can_reencode(cond):
        raise MitigationError(f"token removal re-encodes the prompt, which {type(model).__name__} cannot do; "
                              f"use the strategy 'minimize'")
    eps_u, gap, record, active = _start(model, cond, uncond, x_T, t_first, mode, threshold, target, "remove_tokens",
                                        detector, first_step)
    if active is None:
        return cond, record
    removed = [[] for _ in range(gap.shape[0])]      # words left out (tuples of positions), per image
    candidates = [[tuple(g) for g in cond.word_groups(b)] for b in range(gap.shape[0])]
    if any(len(c) > max_candidates for c, a in zip(candidates, active.tolist()) if a):
        from .explain import token_contributions  # explain builds on this module's neighbours, not on it
        ranked = token_contributions(model, cond, uncond, x_T, steps=1, total_steps=1, method="gradient_x_delta",
                                     timesteps=[t_first], should_stop=should_stop, detector=detector)
        candidates = [[tuple(c.groups[i]) for i in c.ranking()[:max_candidates]] for c in ranked]
        record.passes += 3
    gap = gap.clone()
    left = lambda b: [w for w in candidates[b] if w not in removed[b]]
    for _ in range(max_removals):
        rows = [b for b in torch.nonzero(active).flatten().tolist()  # keep at least one word
                if len(cond.word_groups(b)) - len(removed[b]) > 1 and left(b)]
        if not rows:
            break
        jobs = [(b, w) for b in rows for w in left(b)]
        record.passes += max(sum(1 for row, _ in jobs if row == b) for b in rows)
        scores = []

        def run(part):
            sub = model.encode_without(cond, [(b, [i for word in removed[b] + [w] for i in word]) for b, w in part])
            index = torch.tensor([b for b, _ in part], device=x_T.device)
            eps = model.eps(x_T[index], rows_of_t(t_first, [b for b, _ in part]),
                            sub.embedding.to(cond.embedding.dtype), sub.extra)
            scores.extend(step_score(eps - eps_u[index], detector).float().cpu().tolist())

        with torch.no_grad():
            in_batches(jobs, batch_size, run, should_stop)
        for b in rows:
            options = [(s, w) for (row, w), s in zip(jobs, scores) if row == b]
            reaching = [o for o in options if o[0] <= target]
            score, word = max(reaching) if reaching else min(options)
            removed[b].append(word)
            gap[b] = score
            record.image_iterations[b] += 1
            # later rounds try only the next most effective words of this round: the round's cost stays small
            candidates[b] = [w for _, w in sorted(options) if w != word][:later_candidates]
        record.iterations += 1
        record.losses.append(gap.tolist())
        active &= gap > target
        if not bool(active.any()):
            break
    record.after = gap.tolist()
    record.removed = [["".join(cond.tokens[b][i] for i in w) for w in sorted(r)] for b, r in enumerate(removed)]
    edited = [b for b, r in enumerate(removed) if r]
    if not edited:
        return cond, record
    new = model.encode_without(cond, [(b, [i for w in r for i in w]) for b, r in enumerate(removed)])
    record.padded = [bool(r) and new.padded is not None and new.padded[b] for b, r in enumerate(removed)]
    keep = torch.tensor([not r for r in removed], device=cond.embedding.device).reshape(-1, 1, 1)
    # images left as they were keep their own embedding bit for bit
    return new.with_embedding(torch.where(keep, cond.embedding, new.embedding.to(cond.embedding))), record


def schedule_delay(schedule: str, delay: Optional[float] = None) -> float:
    """A schedule's share of early steps: `delay`, or where None the schedule's measured default."""
    if delay is not None:
        return delay
    return OPPOSITE_DELAY if schedule == "opposite_guidance" else DEFAULT_DELAY


def schedule_scale(schedule: str, early_scale: float) -> float:
    """The guidance scale of a schedule's early steps: 0 for delayed guidance, `early_scale` for opposite guidance."""
    return 0.0 if schedule == "guidance_delay" else early_scale


def schedule_of(early_scale: float) -> str:
    """The schedule an early scale makes: 0 delayed guidance, below 0 opposite guidance."""
    return "guidance_delay" if early_scale == 0 else "opposite_guidance"


def delay_steps(steps: int, delay: float) -> int:
    """How many of the first steps run without text guidance at a given delay (a share of the steps)."""
    if not 0 <= delay < 1:
        raise MitigationError(f"delay must be in [0, 1), got {delay}")
    return int(round(delay * steps))


@dataclass
class GuidanceDelay:
    """An early-guidance schedule as hosts apply it: at steps < `steps`, the marked images are guided at
    `scale` (0: the unconditional prediction, delayed guidance; < 0: away from the prompt, opposite
    guidance); every other image and step keeps the host's CFG."""
    images: torch.Tensor   # (B,) bool
    steps: int
    scale: float = 0.0

    def applies(self, step: int) -> bool:
        return step < self.steps and bool(self.images.any())

    def schedule(self, total_steps: int, guidance: float) -> torch.Tensor:
        """(total_steps, B) scale per step and image, for memoguard.sampling.sample."""
        out = torch.full((total_steps, self.images.shape[0]), float(guidance))
        out[:self.steps, self.images] = self.scale
        return out


def plan_guidance_delay(gap: torch.Tensor, total_steps: int, *, mode: str = "always",
                        threshold: Optional[float] = None, target: float = 0.0, delay: float = DEFAULT_DELAY,
                        early_scale: float = 0.0):
    """(GuidanceDelay or None, record) from the first-step scores (B,) a host already has: no model call.
    early_scale 0 is delayed guidance, < 0 opposite guidance."""
    check_mode(mode, target)
    check_early_scale(early_scale)
    k = delay_steps(total_steps, delay)
    record, active = decide(gap, mode, threshold, target, schedule_of(early_scale))
    if active is None:
        return None, record
    _mark_schedule(record, active, k, early_scale)
    return GuidanceDelay(active, k, early_scale), record


def check_early_scale(early_scale: float) -> None:
    if not early_scale <= 0:
        raise MitigationError(f"early_scale must be <= 0 (0: no guidance, < 0: away from the prompt), got {early_scale}")


def _mark_schedule(record: MitigationRecord, images: torch.Tensor, steps: int, scale: float) -> None:
    record.delay_steps, record.early_scale = steps, float(scale)
    record.image_iterations = [max(n, steps * int(a)) for n, a in zip(record.image_iterations, images.tolist())]


def candidate_seed(seed: int, k: int) -> int:
    """The seed of an image's k-th candidate noise (k = 0: its own)."""
    return (int(seed) + k * SEED_STRIDE) % 2 ** 32


def choose_noise(model: DiffusionModel, cond: PromptEncoding, uncond: PromptEncoding, x_T: torch.Tensor, t_first,
                 seeds: Sequence[int], noise_of: Callable[[Sequence[int]], torch.Tensor], *, mode: str = "always",
                 threshold: Optional[float] = None, target: float = 0.0,
                 candidates: int = DEFAULT_NOISE_CANDIDATES, should_stop: Optional[Callable[[], bool]] = None,
                 detector: str = DEFAULT_DETECTOR):
    """Returns (x_T to sample from, MitigationRecord). seeds: each image's seed; noise_of(seeds) -> x_T of those
    seeds as the caller makes it (so the recorded seed remakes the image). Candidates are tried in turn for the
    images still over `target` (one guided pair each); an image keeps the first under it, else its lowest."""
    check_mode(mode, target)
    if candidates < 1 or len(seeds) != x_T.shape[0]:
        raise MitigationError(f"need candidates >= 1 and one seed per image (got {candidates}, {len(seeds)} seeds "
                              f"for {x_T.shape[0]} images)")
    _, gap, record, active = _start(model, cond, uncond, x_T, t_first, mode, threshold, target, "new_noise", detector)
    if active is None:
        return x_T, record
    best, x = gap.clone(), x_T.clone()
    searching = active.clone()
    for k in range(1, candidates + 1):
        rows = torch.nonzero(searching).flatten().tolist()
        if not rows:
            break
        check_stop(should_stop)
        new_seeds = [candidate_seed(seeds[b], k) for b in rows]
        x_k = noise_of(new_seeds).to(x_T)
        _, gap_k = _first_step(model, cond.rows(rows), uncond, x_k, rows_of_t(t_first, rows), detector)
        record.passes += 2 * len(rows) / len(seeds)
        for j, b in enumerate(rows):
            if gap_k[j] < best[b]:
                best[b], x[b] = gap_k[j], x_k[j]
                record.seeds[b] = new_seeds[j]
            record.image_iterations[b] += 1
        record.iterations += 1
        record.losses.append(best.tolist())
        searching &= best > target
    record.after = best.tolist()
    return x, record


def optimize_noise(model: DiffusionModel, cond: PromptEncoding, uncond: PromptEncoding, x_T: torch.Tensor, t_first,
                   *, mode: str = "always", threshold: Optional[float] = None, target: float = 0.0, lr: float = 0.05,
                   max_iters: int = 10, should_stop: Optional[Callable[[], bool]] = None, first_step=None,
                   detector: str = DEFAULT_DETECTOR):
    """Returns (x_T to sample from, MitigationRecord): SAIL's optimized initial noise for the images over `target`
    (and, in auto mode, flagged); the others keep theirs bit for bit. Each Adam step is 4 evaluations and a
    backward through them; the score of each new noise comes free with the next step's first two."""
    check_settings(mode, lr, max_iters, target)
    _, gap, record, active = _start(model, cond, uncond, x_T, t_first, mode, threshold, target, "optimize_noise",
                                    detector, first_step)
    if active is None:
        return x_T, record
    rows = torch.nonzero(active).flatten().tolist()
    index = torch.tensor(rows, device=x_T.device)
    sub, t = cond.rows(rows), rows_of_t(t_first, rows)
    emb, length = sub.embedding.detach(), sub.embedding.shape[1]
    x = x_T[index].detach().float().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    best, best_x, best_step = gap[rows].clone(), x_T[index].clone(), [0] * len(rows)
    searching = torch.ones(len(rows), dtype=torch.bool)
    share = 1 / gap.shape[0]

    def guidance_difference(z, sel):
        extra = {k: v[sel] for k, v in sub.extra.items()}
        return (model.eps(z, t if not t.dim() else t[sel], emb[sel], extra)
                - model.eps_uncond(z, t if not t.dim() else t[sel], uncond, length))

    for step in range(max_iters + 1):
        check_stop(should_stop)
        sel = torch.nonzero(searching).flatten()
        descend = step < max_iters
        with torch.enable_grad() if descend else torch.no_grad():
            z = x[sel.to(x.device)].to(x_T.dtype)
            diff = guidance_difference(z, sel.to(x.device))
            record.passes += 2 * len(sel) * share
            if step:  # the noise the last Adam step made, scored as the verdict scores it
                score = step_score(diff.detach(), detector).float().cpu()
                for j, k in enumerate(sel.tolist()):
                    if score[j] < best[k]:
                        best[k], best_x[k], best_step[k] = score[j], z[j].detach(), step
                searching &= best > target
                if not bool(searching.any()):
                    break
                keep = searching[sel]
                sel, z, diff = sel[keep], z[keep.to(z.device)], diff[keep.to(diff.device)]
            if not descend:
                break
            unit = diff / diff.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, *[1] * (diff.dim() - 1))
            sharpness = guidance_difference(z + unit, sel.to(x.device)).flatten(1).norm(dim=1)
            loss = sharpness.float() + SAIL_GAUSSIAN_WEIGHT * x[sel.to(x.device)].flatten(1).norm(dim=1)
            # autograd.grad, not backward(): the host's weights must not collect .grad
            (x.grad,) = torch.autograd.grad(loss.sum(), [x])
        record.passes += 2 * len(sel) * share + 2 * 4 * len(sel) * share  # the shifted pair, the backward through 4
        opt.step()
        record.iterations += 1
        record.losses.append(best.tolist())
    out = x_T.clone()
    out[index] = best_x.to(x_T.dtype)
    for k, b in enumerate(rows):
        record.after[b], record.image_iterations[b] = float(best[k]), best_step[k]
    return out, record


def padding_positions(cond: PromptEncoding, b: int) -> List[int]:
    """Row b's padding positions, nearest the end-of-text first: in each 77-position chunk, what follows the
    first position after the chunk's last prompt token (its end-of-text). BOS and prompt tokens are never padding."""
    prompt, frozen = cond.prompt_mask[b].tolist(), cond.frozen_mask[b].tolist()
    out = []
    for start in range(0, len(prompt), CHUNK):
        chunk = range(start, min(start + CHUNK, len(prompt)))
        words = [i for i in chunk if prompt[i]]
        after = (words[-1] if words else start) + 1  # the end-of-text's position (right after BOS when empty)
        out += [i for i in chunk if i > after and not prompt[i] and not frozen[i]]
    return out


def mask_padding(model: Denoiser, cond: PromptEncoding, uncond: PromptEncoding, x_T: torch.Tensor, t_first, *,
                 mode: str = "always", threshold: Optional[float] = None, target: float = 0.0,
                 pad_share: float = DEFAULT_PAD_SHARE, first_step=None, detector: str = DEFAULT_DETECTOR):
    """Returns (PromptEncoding to sample with, MitigationRecord); one prompt row per image of x_T. Every image over
    the target (and, in auto mode, flagged) is masked, whatever the masked first-step score: on the bundled model
    masking stopped copies whose first-step score it raised (keeping those prompts left 16 % of the copies, not
    7 %). Images left alone keep their embedding bit for bit."""
    check_mode(mode, target)
    if not 0 < pad_share <= 1:
        raise MitigationError(f"pad_share must be in (0, 1], got {pad_share}")
    if not model.pads_with_end_token:
        raise MitigationError(PADDING_PREMISE)
    eps_u, gap, record, active = _start(model, cond, uncond, x_T, t_first, mode, threshold, target, "mask_padding",
                                        detector, first_step)
    if active is None:
        return cond, record
    rows = torch.nonzero(active).flatten().tolist()
    masked = torch.zeros(cond.embedding.shape[:2], dtype=torch.bool)
    for b in rows:
        pads = [i for i in padding_positions(cond, b) if model.clip_positions is None or i < model.clip_positions]
        masked[b, pads[:math.ceil(pad_share * len(pads))]] = True
        record.masked[b], record.image_iterations[b] = int(masked[b].sum()), 1
    new = cond.with_embedding(torch.where(masked.to(cond.embedding.device).unsqueeze(-1),
                                          torch.zeros_like(cond.embedding), cond.embedding))
    with torch.no_grad():
        index = torch.tensor(rows, device=x_T.device)
        sub = new.rows(rows)
        after = step_score(model.eps(x_T[index], rows_of_t(t_first, rows), sub.embedding, sub.extra)
                           - eps_u[index], detector).float().cpu()
    record.passes += len(rows) / gap.shape[0]
    record.iterations = 1
    for k, b in enumerate(rows):
        record.after[b] = float(after[k])
    return new, record


@dataclass
class Mitigation:
    """What to sample with after mitigation: the prompt, the initial noise, the per-step guidance, and what was done."""
    cond: PromptEncoding
    guidance: Optional[torch.Tensor]  # (steps, B) scale per step and image; None: the run's own throughout
    record: MitigationRecord
    x_T: Optional[torch.Tensor] = None  # new_noise, optimize_noise: the noise to start from; None: the run's own


def mitigate(model: DiffusionModel, cond: PromptEncoding, uncond: PromptEncoding, x_T: torch.Tensor,
             timesteps: Sequence, guidance: float, *, strategy: str = "auto", mode: str = "always",
             threshold: Optional[float] = None, target: float = 0.0, lr: float = 0.05, max_iters: int = 10,
             max_removals: int = 3, delay: Optional[float] = None, early_scale: float = DEFAULT_EARLY_SCALE,
             seeds: Optional[Sequence[int]] = None, noise_of: Optional[Callable] = None,
             noise_candidates: int = DEFAULT_NOISE_CANDIDATES, pad_share: float = DEFAULT_PAD_SHARE,
             should_stop: Optional[Callable[[], bool]] = None, detector: str = DEFAULT_DETECTOR) -> Mitigation:
    """One front door to every strategy for a run over `timesteps` at `guidance`; strategy "auto" is
    DEFAULT_STRATEGY (DEFAULT_WITHOUT_PADDING on a model whose prompt positions are not CLIP's). new_noise needs
    `seeds` (one per image) and `noise_of` (seeds -> x_T). delay None: the schedule's own default (DEFAULT_DELAY
    for guidance_delay, OPPOSITE_DELAY for opposite_guidance). detector: the verdict's (threshold and target are in
    its units)."""
    if strategy == "auto":
        strategy = DEFAULT_STRATEGY if model.pads_with_end_token else DEFAULT_WITHOUT_PADDING
    strategy = check_strategy(strategy)
    start, _, schedule = strategy.partition("+")
    delay = schedule_delay(schedule or start, delay)
    if "opposite_guidance" in (start, schedule):  # before any model call
        check_early_scale(early_scale)
    t_first = timesteps[0]
    new_x = None
    if start in SCHEDULES:
        _, gap = _first_step(model, cond, uncond, x_T, t_first, detector)
        plan, record = plan_guidance_delay(gap, len(timesteps), mode=mode, threshold=threshold, target=target,
                                           delay=delay, early_scale=schedule_scale(start, early_scale))
        return Mitigation(cond, None if plan is None else plan.schedule(len(timesteps), guidance), record)
    if start == "minimize":
        emb, record = minimize_embedding(model, cond, uncond, x_T, t_first, mode=mode, threshold=threshold,
                                         target=target, lr=lr, max_iters=max_iters, should_stop=should_stop,
                                         detector=detector)
        cond = cond.with_embedding(emb)
    elif start == "remove_tokens":
        cond, record = remove_tokens(model, cond, uncond, x_T, t_first, mode=mode, threshold=threshold,
                                     target=target, max_removals=max_removals, should_stop=should_stop,
                                     detector=detector)
    elif start == "optimize_noise":
        new_x, record = optimize_noise(model, cond, uncond, x_T, t_first, mode=mode, threshold=threshold,
                                       target=target, lr=lr, max_iters=max_iters, should_stop=should_stop,
                                       detector=detector)
    elif start == "mask_padding":
        cond, record = mask_padding(model, cond, uncond, x_T, t_first, mode=mode, threshold=threshold, target=target,
                                    pad_share=pad_share, detector=detector)
    else:
        if seeds is None or noise_of is None:
            raise MitigationError("the strategy 'new_noise' needs each image's seed and the caller's noise function")
        new_x, record = choose_noise(model, cond, uncond, x_T, t_first, seeds, noise_of, mode=mode,
                                     threshold=threshold, target=target, candidates=noise_candidates,
                                     should_stop=should_stop, detector=detector)
    record.strategy = strategy
    changed = torch.tensor([n > 0 for n in record.image_iterations])
    if not schedule or not bool(changed.any()):
        return Mitigation(cond, None, record, new_x)
    scale = schedule_scale(schedule, early_scale)
    plan = GuidanceDelay(changed, delay_steps(len(timesteps), delay), scale)
    _mark_schedule(record, changed, plan.steps, scale)
    return Mitigation(cond, plan.schedule(len(timesteps), guidance), record, new_x)
