"""The host contract: what ComfyUI, A1111 and Forge hand MemoGuard, turned into the core's terms once.

Adapters keep only host glue (where the predictions, sigmas and conditionings are found); the
conversions, the prompt encodings, the settings and what to do when MemoGuard's own work fails
live here, so every host computes them the same way.

Conventions (see memoguard.score): k-diffusion / EDM hosts call the model with sigma and get the
denoised x0 at x = x0 + sigma * eps (alpha = 1); rectified-flow models (SD3, Flux) sample
x = sigma * eps + (1 - sigma) * x0 = x0 + sigma * v, which memoguard reads in the same form with the velocity v
in the place of eps (memoguard.score): the same conversions, and the flow's sigma is its noise level; timestep
samplers use the VP schedule.
"""
import math
import re
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .explain import check_method
from .mitigate import (DEFAULT_EARLY_SCALE, MitigationError, SCHEDULES, check_early_scale, check_settings,
                       delay_steps, schedule_delay, schedule_scale)
from .errors import MemoGuardError
from .model import CHUNK, TOKENS_PER_CHUNK, Interrupted, PromptEncoding, fit_shorter_prompt, is_out_of_memory, \
    release_memory
from .score import coefficients_vp, eps_difference

# what a host's sampler hook can run: the schedules read the predictions CFG already has; the starts change the
# prompt's embedding at the first step (padding masking and token removal need the prompt's tokens or text)
HOST_STRATEGIES = ("guidance_delay", "opposite_guidance", "minimize", "mask_padding", "remove_tokens")

__all__ = ["CHUNK", "TOKENS_PER_CHUNK", "HOST_STRATEGIES", "coefficients_kdiffusion",
           "coefficients_vp", "noise_level_vp", "prediction_name", "denoised_difference",
           "combine_rows", "early_guidance", "cond_for_early_guidance", "chunked_encoding", "empty_encoding",
           "WebUIPromptText", "HostSettings", "failure_message", "release_memory", "is_out_of_memory", "Interrupted"]


# -- schedules ------------------------------------------------------------------------------------
def coefficients_kdiffusion(sigma):
    """(alpha, sigma) of x = x0 + sigma * eps, and of a rectified flow's x = x0 + sigma * v."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    return torch.ones_like(sigma), sigma


def noise_level_vp(alphas_cumprod: torch.Tensor, t: float) -> float:
    """memoguard's noise level of a VP timestep t."""
    abar = float(alphas_cumprod[int(round(t))])
    return math.sqrt((1 - abar) / abar)


def prediction_name(kind: Optional[str]) -> Optional[str]:
    """What a checkpoint predicts, as calibrations record it (eps | v | flow | edm), from a host's name for
    it: diffusers' epsilon / v_prediction, Forge's predictor types, ComfyUI's ModelType names."""
    if kind is None:
        return None
    kind = str(kind).lower()
    if kind.startswith("v_prediction") or kind == "v":
        return "v"
    if kind in ("eps", "epsilon"):
        return "eps"
    if "flow" in kind or kind in ("flux", "const"):
        return "flow"
    return kind


# -- predictions -> the score's eps_c - eps_u --------------------------------------------------------
def denoised_difference(cond_denoised: torch.Tensor, uncond_denoised: torch.Tensor, sigma) -> torch.Tensor:
    """eps_c - eps_u per image from a k-diffusion / EDM host's denoised predictions (a rectified flow's: v_c - v_u,
    the same conversion in memoguard's reading of the flow)."""
    return eps_difference(cond_denoised, uncond_denoised, "x0", 1.0, sigma)


def combine_rows(diff_rows: torch.Tensor, weights: Sequence[Sequence[float]]) -> torch.Tensor:
    """Per-row eps_c - eps_u -> per image, as CFG adds AND sub-prompts: weights[i] holds the weight of each
    of image i's rows, which follow each other in that order."""
    out, row = [], 0
    for image in weights:
        d = None
        for k, weight in enumerate(image):
            term = diff_rows[row + k:row + k + 1]
            term = term if weight == 1.0 else weight * term
            d = term if d is None else d + term
        out.append(d)
        row += len(image)
    return torch.cat(out)


def cond_for_early_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float, guidance: float) -> torch.Tensor:
    """For hosts that can only replace the conditional prediction before their CFG (A1111's on_cfg_denoised): the
    cond prediction c' that CFG's u + guidance (c' - u) turns into a schedule's u + scale (c - u). Linear in c, so it
    holds per AND sub-prompt too (u + guidance * sum_k weight_k (c'_k - u)). At guidance 0 CFG gives u whatever c'."""
    if scale == 0:
        return uncond
    return cond if guidance == 0 else uncond + (scale / guidance) * (cond - uncond)


def early_guidance(guided: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, images: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """A schedule's early step: the marked images (B,) bool are guided at `scale` (0: the unconditional prediction,
    delayed guidance; < 0: away from the prompt, opposite guidance), the others keep the host's guided prediction."""
    mask = images.to(guided.device).reshape(-1, *([1] * (guided.dim() - 1)))
    steered = uncond if scale == 0 else uncond + scale * (cond - uncond)
    return torch.where(mask, steered.to(guided.dtype), guided)


# -- prompt encodings from a host's conditioning tensors ---------------------------------------------
def _bos(batch: int, length: int) -> torch.Tensor:
    return (torch.arange(length) % CHUNK == 0).expand(batch, -1).clone()


def chunked_encoding(embedding: torch.Tensor, tokens: Optional[List[List[str]]] = None,
                     prompt_mask: Optional[torch.Tensor] = None, extra: Optional[dict] = None,
                     words: Optional[List[List[int]]] = None) -> PromptEncoding:
    """A host's prompt conditioning (B, 77 * chunks, C) as a PromptEncoding: every chunk's BOS frozen.
    Without token strings every position but the BOS counts as prompt; words: memoguard.model.word_numbers of
    each row, where the host's tokenizer marks word ends."""
    b, length, _ = embedding.shape
    if length % CHUNK:
        raise ValueError(f"a CLIP conditioning has a multiple of {CHUNK} positions, got {length}")
    frozen = _bos(b, length)
    extra = {k: v.expand(b, *v.shape[1:]) if v.shape[0] == 1 and b > 1 else v for k, v in (extra or {}).items()}
    return PromptEncoding(embedding, tokens or [[""] * length for _ in range(b)],
                          ~frozen if prompt_mask is None else prompt_mask, frozen, extra, words=words)


def empty_encoding(embedding: torch.Tensor, extra: Optional[dict] = None) -> PromptEncoding:
    """The negative prompt's conditioning: no prompt tokens, nothing moves. It may be longer than the prompt
    (Denoiser.eps_pair then evaluates the two apart)."""
    b, length, _ = embedding.shape
    none = torch.zeros(b, length, dtype=torch.bool)
    return PromptEncoding(embedding, [[""] * length for _ in range(b)], none, none.clone(), dict(extra or {}))


# -- WebUI prompts: re-encoding without words -----------------------------------------------------------
BREAK = "BREAK"  # a WebUI parser's fragment (BREAK, -1) starts a new 77-token chunk


def _weight_text(weight: float) -> str:
    """A weight as the WebUI's emphasis syntax reads it back exactly: positional digits, no exponent."""
    return format(Decimal(repr(float(weight))), "f")


def _escaped(text: str) -> str:
    return re.sub(r"([\\()\[\]])", r"\\\1", text)


@dataclass
class WebUIPromptText:
    """How a WebUI (A1111, Forge) turns a prompt's text into conditioning, so that the core can re-encode it
    without some of its words (memoguard.model.Denoiser.encode_without) exactly as the WebUI would encode the
    shorter prompt: emphasis weights, BREAK, textual-inversion names and chunking stay the host's own.

    parse: the host's emphasis parser, text -> [(fragment, weight)] with (BREAK, -1) for a BREAK;
    split: the text encoder tokenizer's word split (CLIP's pre-tokenizer: each piece ends in one "</w>" token);
    encode: texts -> ((B, L, C) embedding padded to the batch's longest prompt, {key: (B, ...)} of what else the
    text sets, e.g. SDXL's pooled vector), the host's own conditioning function.
    escape: whether the host reads emphasis syntax at all (off: a prompt is taken literally)."""
    parse: Callable[[str], Sequence]
    split: Callable[[str], List[str]]
    encode: Callable[[List[str]], Tuple[torch.Tensor, Dict[str, torch.Tensor]]]
    escape: bool = True

    def _fragments(self, text: str) -> List[Tuple[List[str], float]]:
        """(words, weight) per fragment; a BREAK is ([], -1)."""
        out = []
        for fragment, weight in self.parse(text):
            out.append(([], -1) if (fragment, weight) == (BREAK, -1) else (self.split(fragment), weight))
        return out

    def word_count(self, text: str) -> int:
        return sum(len(words) for words, _ in self._fragments(text))

    def without(self, text: str, drop) -> str:
        """The prompt in the host's syntax with the words numbered in `drop` (0-based over the whole prompt) left
        out; every other word keeps its weight and every BREAK its place."""
        parts, number = [], 0
        for words, weight in self._fragments(text):
            if weight == -1 and not words:
                parts.append(BREAK)
                continue
            kept = [w for k, w in enumerate(words, start=number) if k not in drop]
            number += len(words)
            if not kept:
                continue
            if not self.escape:
                parts.append(" ".join(kept))
            elif weight == 1:
                parts.append(_escaped(" ".join(kept)))
            else:
                parts.append(f"({_escaped(' '.join(kept))}:{_weight_text(weight)})")
        return " ".join(parts)

    def mismatch(self, cond: PromptEncoding, texts: Sequence[str]) -> Optional[str]:
        """Why `cond` (one row per text) cannot be re-encoded from `texts`, or None: every row's words must be the
        text's words, and the host's encoding of the texts must be the conditioning the sampler uses."""
        if cond.words is None:
            return "the tokenizer marks no word ends"
        for b, text in enumerate(texts):
            if self.word_count(text) != len(cond.word_groups(b)):
                return ("the prompt's words do not map onto its tokens one to one (an embedding's name found inside "
                        "a word?)")
        distinct = list(dict.fromkeys(texts))  # as the sampler encoded them: each distinct prompt once, together
        embedding, extra = self.encode(distinct)
        row = [distinct.index(text) for text in texts]
        if embedding.shape[1:] != cond.embedding.shape[1:] or not _close(embedding[row], cond.embedding) or any(
                k not in cond.extra or not _close(v[row], cond.extra[k]) for k, v in extra.items()):
            return "the sampler's conditioning is not the prompt's text encoded again (an extension changed it?)"
        return None

    def encode_without(self, cond: PromptEncoding, edits) -> PromptEncoding:
        """Denoiser.encode_without for cond.texts: one row per (row, positions to leave out), at cond's length.
        Each shorter prompt is encoded alone, as the WebUI encodes a prompt generated alone: its emphasis rescales
        by the mean over the prompts encoded together. One that lost 77-token chunks is brought back to the length
        by fit_shorter_prompt: the prompt typed alone where its length divides cond's, else marked padded."""
        length = cond.embedding.shape[1]
        embeddings, extras, padded = [], [], []
        empty = lambda: self.encode([""])[0]
        for row, drop in edits:
            embedding, extra = self.encode([self.without(cond.texts[row], {cond.words[row][i] for i in drop})])
            try:
                embedding, was_padded = fit_shorter_prompt(embedding, length, empty)
            except ValueError as e:
                raise MemoGuardError(str(e)) from None
            embeddings.append(embedding)
            extras.append(extra)
            padded.append(was_padded)
        sub = cond.rows([row for row, _ in edits])
        sub.extra.update({k: torch.cat([e[k] for e in extras]).to(sub.extra[k]) for k in extras[0]})
        return replace(sub.with_embedding(torch.cat(embeddings).to(cond.embedding)),
                       padded=padded if any(padded) else None)


def cut_out(text: str, spans) -> str:
    """A prompt typed without the words at the (start, end) spans of its text (ComfyUI re-tokenizes it). Where a cut
    word is followed by a character of its own (a comma), that character joins the word before, as it is typed
    without the word ("a ring, sky" less "ring" is "a, sky": SentencePiece marks the space before it); two words the
    cut would join stay apart."""
    for start, end in sorted(spans, reverse=True):
        left, right = text[:start], text[end:]
        if right[:1].strip():
            left = left.rstrip()
            if left[-1:].isalnum() and right[:1].isalnum():
                left += " "
        text = left + right
    return text


def merge_embedding_words(words: List[str], tokenize: Callable[[List[str]], List[List[int]]], find_at) -> List[str]:
    """The words of a prompt fragment with each textual-inversion embedding's name as one word (its vectors are one
    word's positions), found as the WebUI's chunker finds it: find_at(ids, position) -> (embedding or None, how many
    ids its name takes) over the fragment's token ids (the host's EmbeddingDatabase.find_embedding_at_position);
    tokenize: words -> their ids. A name that spans several split words ("ng_deep_v1") joins them."""
    starts, ids = [], []
    for word_ids in tokenize(list(words)) if words else []:
        starts.append(len(ids))
        ids += list(word_ids)
    word_at = {start: k for k, start in enumerate(starts)}
    out, k = [], 0
    while k < len(words):
        embedding, taken = find_at(ids, starts[k]) if starts[k] < len(ids) else (None, None)
        end = starts[k] + (taken or 0)
        if embedding is not None and (end == len(ids) or end in word_at) and end > starts[k]:
            after = word_at.get(end, len(words))
            out.append("".join(words[k:after]))
            k = after
        else:
            out.append(words[k])
            k += 1
    return out


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the rounding of a re-run in half precision (relative to the tensor's scale)."""
    a, b = a.float(), b.to(a.device).float()
    return a.shape == b.shape and float((a - b).abs().max()) <= 1e-2 * max(float(b.abs().max()), 1e-6)


# -- what the user sets ------------------------------------------------------------------------------
@dataclass
class HostSettings:
    """Everything a MemoGuard user sets in any host, checked once (MemoGuardError subclasses name the field)."""
    window: int = 1                     # steps the verdict averages over, from the first
    fpr: float = 0.01                   # share of benign prompts a calibrated threshold may flag
    threshold: Optional[float] = None   # overrides the calibration's
    explain_steps: int = 1
    explain_method: str = "auto"        # memoguard.explain.METHODS
    mitigation: str = "off"             # off | always | auto
    strategy: str = "guidance_delay"    # one of HOST_STRATEGIES, or "auto" (memoguard.mitigate.host_strategy)
    target: float = 0.0
    lr: float = 0.05
    max_iters: int = 10
    delay: Optional[float] = None       # schedules: share of the first steps; None: the strategy's measured default
    early_scale: float = DEFAULT_EARLY_SCALE  # opposite guidance's scale in those steps

    def __post_init__(self):
        if self.window < 1 or self.explain_steps < 1:
            raise ValueError(f"window and explanation steps must be >= 1 (got {self.window}, {self.explain_steps})")
        if not 0 < self.fpr < 1:
            raise ValueError(f"false-positive rate must be in (0, 1), got {self.fpr}")
        if self.threshold is not None and not self.threshold >= 0:
            raise ValueError(f"threshold must be >= 0 (or unset), got {self.threshold}")
        check_settings(self.mitigation, self.lr, self.max_iters, self.target)
        if self.strategy not in ("auto",) + HOST_STRATEGIES:
            raise MitigationError(f"strategy must be auto or one of {', '.join(HOST_STRATEGIES)} in a host, got "
                                  f"{self.strategy!r}")
        if self.delay is not None:  # None: the schedules' measured defaults
            delay_steps(1, self.delay)
        check_early_scale(self.early_scale)
        check_method(self.explain_method)

    def early_steps(self, strategy: str):
        """(share of the first steps, their guidance scale) of a schedule strategy: 0 is delayed guidance's scale."""
        return schedule_delay(strategy, self.delay), schedule_scale(strategy, self.early_scale)

    def threshold_from(self, calibration) -> Optional[float]:
        """The threshold verdicts and mode 'auto' compare with: the explicit one, else the calibration's."""
        if self.threshold is not None:
            return float(self.threshold)
        return None if calibration is None else calibration.threshold(self.fpr)

    @property
    def changes_prompt(self) -> bool:
        """A start that changes the prompt's embedding at the first step (minimize, mask_padding, remove_tokens)."""
        return self.mitigation != "off" and self.strategy in HOST_STRATEGIES and self.strategy not in SCHEDULES

    @property
    def delays(self) -> bool:
        """A schedule strategy (delayed or opposite guidance) is on."""
        return self.mitigation != "off" and self.strategy in SCHEDULES


# -- MemoGuard's own failures never cost the image ---------------------------------------------------
def failure_message(doing: str, error: BaseException) -> str:
    """One line for the user when MemoGuard's own work fails; the generation goes on with the plain prompt."""
    if isinstance(error, Interrupted):
        return f"MemoGuard stopped {doing}: the generation was interrupted"
    if is_out_of_memory(error):
        return (f"MemoGuard ran out of memory {doing}; it freed what it held and the image is sampled with the "
                f"plain prompt (fewer images per batch, fewer explanation steps or iterations need less)")
    return f"MemoGuard failed {doing}: {type(error).__name__}: {error}"
