"""The small interface every host adapter implements, and what the core builds on it.

A `Denoiser` answers "what noise does the model see in x at t under this prompt embedding" (`eps`,
differentiable in the embedding) with `coefficients(t)` (x_t = alpha*x0 + sigma*eps): enough for
the score, explanation and mitigation at a host's own step (A1111, Forge). A `DiffusionModel` adds
"what is this prompt as text-encoder output" (`encode`) and a schedule, so the core can run a
generic DDIM loop in any convention (diffusers, the bundled model, ComfyUI).
"""
import gc
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .errors import MemoGuardError
from .score import check_parameterization, to_eps

CHUNK = 77  # positions per CLIP window in every host: BOS + 75 tokens + EOS/padding
WORD_START = "\u2581"  # sentencepiece's mark of a piece that starts a word
TOKENS_PER_CHUNK = CHUNK - 2


@dataclass
class PromptEncoding:
    """Text-encoder output of a batch of prompts, with the tokens behind each position.

    embedding: (B, L, C), L = 77 * chunks. tokens[b][i] is the string at position i.
    prompt_mask[b, i] is True for real prompt tokens (not BOS, EOS or padding).
    frozen_mask[b, i] is True where mitigation must not move the embedding (every BOS).
    extra: model-specific conditioning that is not optimised (SDXL pooled text, size ids).
    ids: token ids (B, L), kept by models that can re-encode a prompt with tokens removed.
    words: words[b][i] numbers the word position i belongs to (BPE pieces of one word share it; -1 outside
    the prompt), where the adapter's tokenizer marks word ends; None: every token is its own word.
    texts: each row's prompt text, kept by adapters that re-encode from the text (ComfyUI: its weights syntax).
    padded: per row of an encoding made without words, whether the shorter prompt was padded to this length (with
    the empty prompt's chunk: fit_shorter_prompt; or in place, each chunk), which the prompt typed alone is not;
    None: no row was.
    """
    embedding: torch.Tensor
    tokens: List[List[str]]
    prompt_mask: torch.Tensor
    frozen_mask: torch.Tensor
    extra: dict = field(default_factory=dict)
    ids: Optional[torch.Tensor] = None
    words: Optional[List[List[int]]] = None
    texts: Optional[List[str]] = None
    padded: Optional[List[bool]] = None

    def __post_init__(self):
        if self.embedding.dim() != 3:
            raise ValueError(f"prompt embedding must be (batch, tokens, channels), got {tuple(self.embedding.shape)}")
        b, l, _ = self.embedding.shape
        for name in ("prompt_mask", "frozen_mask"):
            if tuple(getattr(self, name).shape) != (b, l):
                raise ValueError(f"{name} must be ({b}, {l}), got {tuple(getattr(self, name).shape)}")

    def with_embedding(self, embedding: torch.Tensor) -> "PromptEncoding":
        return PromptEncoding(embedding, self.tokens, self.prompt_mask, self.frozen_mask, self.extra, self.ids,
                              self.words, self.texts, self.padded)

    def rows(self, index) -> "PromptEncoding":
        """The encoding of the rows `index` (a list or tensor of row numbers), in that order."""
        index = torch.as_tensor(index, dtype=torch.long)
        n = self.embedding.shape[0]
        pick = lambda t: t[index.to(t.device)] if t.shape[0] == n else t  # a shared (1, ...) extra stays shared
        return PromptEncoding(pick(self.embedding), [self.tokens[i] for i in index.tolist()], pick(self.prompt_mask),
                              pick(self.frozen_mask), {k: pick(v) for k, v in self.extra.items()},
                              None if self.ids is None else pick(self.ids),
                              None if self.words is None else [self.words[i] for i in index.tolist()],
                              None if self.texts is None else [self.texts[i] for i in index.tolist()])

    def repeat_rows(self, times: int) -> "PromptEncoding":
        """Each prompt's row repeated `times` times in place (prompt-major)."""
        if times == 1:
            return self
        return self.rows(torch.arange(self.embedding.shape[0]).repeat_interleave(times))

    def prompt_tokens(self, b: int = 0) -> List[str]:
        return [tok for tok, keep in zip(self.tokens[b], self.prompt_mask[b].tolist()) if keep]

    def word_groups(self, b: int = 0) -> List[List[int]]:
        """The prompt positions of row b grouped by word, in order (each token alone where words are unknown)."""
        positions = [i for i, keep in enumerate(self.prompt_mask[b].tolist()) if keep]
        if self.words is None:
            return [[i] for i in positions]
        groups = {}
        for i in positions:
            groups.setdefault(self.words[b][i], []).append(i)
        return list(groups.values())


def word_numbers(ends_word: Sequence[bool], in_prompt: Sequence[bool]) -> List[int]:
    """Per position, the number of its word within the prompt (-1 outside it): a word runs to a token that ends
    one (CLIP's BPE marks it "</w>"; sentencepiece_word_ends for T5)."""
    out, word = [], 0
    for ends, keep in zip(ends_word, in_prompt):
        out.append(word if keep else -1)
        word += int(keep and ends)
    return out


def sentencepiece_word_ends(pieces: Sequence[str], segments: Sequence[int]) -> List[bool]:
    """For word_numbers: whether each piece of a sentencepiece (T5) tokenization ends a word. The next piece starts
    one where it carries the word-start mark, is punctuation or follows punctuation (CLIP's BPE splits punctuation off
    too, so both tokenizers count the same words), or opens another segment (a host's weights groups; 0: outside
    the prompt)."""
    def starts(i):
        text = pieces[i].replace(WORD_START, "")
        punctuation = lambda j: bool(pieces[j].replace(WORD_START, "")) and all(
            c in string.punctuation for c in pieces[j].replace(WORD_START, ""))
        return (pieces[i].startswith(WORD_START) or (bool(text) and punctuation(i)) or punctuation(i - 1)
                or segments[i] != segments[i - 1])
    return [i + 1 == len(pieces) or starts(i + 1) for i in range(len(pieces))]


class Denoiser(ABC):
    """What every adapter implements: the network's prediction at (x, t) under a prompt embedding, and the
    schedule's coefficients there. Gradients must flow from `eps` back to `embedding`. Hosts that sample
    themselves (A1111, Forge) implement only this; the core's explanation and mitigation run on it at the
    host's own step (timesteps given)."""

    parameterization: str = "eps"   # what the network outputs: eps, v, x0 or flow
    prediction: Optional[str] = None  # what it was trained to predict (eps, v, flow), when the adapter outputs x0
    reencodes: bool = False         # implements encode_without
    pads_with_end_token: bool = True  # the prompt's positions are CLIP's 77-token chunks, padded with its end token
    clip_positions: Optional[int] = None  # how many leading positions are those chunks (None: all; SD3: then T5's)
    # a shorter conditioning is repeated to a longer one's length (CLIP chunks, as the hosts' CFG does); where not
    # (an LLM encoder's variable length under a mask: Qwen-Image), each is evaluated at its own length
    repeats_shorter_prompt: bool = True

    @abstractmethod
    def raw_prediction(self, x: torch.Tensor, t: torch.Tensor, embedding: torch.Tensor, extra: dict) -> torch.Tensor:
        """The network's output for a batch (same batch size for x, t and embedding)."""

    @abstractmethod
    def coefficients(self, t: torch.Tensor):
        """(alpha, sigma) at t so that x_t = alpha * x0 + sigma * eps; scalars or (B,) tensors."""

    def can_reencode(self, cond: PromptEncoding) -> bool:
        """Whether encode_without serves this encoding (it was made by this adapter's encode())."""
        return self.reencodes and cond.ids is not None

    def encode_without(self, cond: PromptEncoding, edits) -> PromptEncoding:
        """One row per edit (row of `cond`, positions to leave out): the prompt re-encoded without those
        tokens, at cond's length L. Adapters that implement it set `reencodes`."""
        raise NotImplementedError(f"{type(self).__name__} cannot re-encode a prompt")

    def noise_level(self, t) -> float:
        """sigma / alpha at t: the k-diffusion sigma, the same for every convention (memoguard.calibration)."""
        alpha, sigma = self.coefficients(torch.as_tensor(t).reshape(1))
        return float(torch.as_tensor(sigma).reshape(-1)[0] / torch.as_tensor(alpha).reshape(-1)[0])

    def eps(self, x: torch.Tensor, t: torch.Tensor, embedding: torch.Tensor, extra: Optional[dict] = None) -> torch.Tensor:
        check_parameterization(self.parameterization)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        alpha, sigma = self.coefficients(t)
        pred = self.raw_prediction(x, t, embedding, extra or {})
        return to_eps(pred, self.parameterization, x, alpha, sigma)

    def eps_uncond(self, x, t, uncond: "PromptEncoding", length: int) -> torch.Tensor:
        """eps under the unconditional prompt for every image of x (a shared uncond row serves them all)."""
        batch = x.shape[0]
        emb = uncond.embedding
        if emb.shape[1] != length and length % emb.shape[1] == 0 and self.repeats_shorter_prompt:
            emb = match_length(emb, length)
        return self.eps(x, t, expand_batch(emb, batch), {k: expand_batch(v, batch) for k, v in uncond.extra.items()})

    def eps_pair(self, x, t, cond: PromptEncoding, uncond: PromptEncoding, cond_embedding=None):
        """(eps_c, eps_u) as classifier-free guidance computes them: one batched call when the prompt and the
        negative prompt have the same length (or the negative repeats to it, as the hosts do), two calls when
        they do not (a negative longer than the prompt)."""
        cond_emb = cond.embedding if cond_embedding is None else cond_embedding
        length = cond_emb.shape[1]
        if length % uncond.embedding.shape[1] or (length != uncond.embedding.shape[1]
                                                  and not self.repeats_shorter_prompt):
            return self.eps(x, t, cond_emb, cond.extra), self.eps_uncond(x, t, uncond, length)
        uncond_emb = match_length(uncond.embedding, length).expand(cond_emb.shape[0], -1, -1)
        extra = {k: torch.cat([v, expand_batch(uncond.extra[k], v.shape[0])]) for k, v in cond.extra.items()}
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        eps = self.eps(torch.cat([x, x]), t.repeat(2), torch.cat([cond_emb, uncond_emb.to(cond_emb.dtype)]), extra)
        return eps.chunk(2)


class DiffusionModel(Denoiser):
    """A denoiser that also encodes prompts and has its own schedule: the standalone path (diffusers, the
    bundled model) and ComfyUI, where the core samples, calibrates and re-encodes."""

    init_noise_sigma: float = 1.0   # x_T = noise * init_noise_sigma
    guidance: float = 7.5           # classifier-free guidance scale this model samples well at
    embedded_guidance: Optional[float] = None  # a distilled model's guidance input (Flux dev); calibrated at it

    @abstractmethod
    def timesteps(self, steps: int) -> torch.Tensor:
        """The sampling schedule, noisiest first, `steps` entries."""

    @abstractmethod
    def encode(self, prompts: List[str]) -> PromptEncoding:
        """Text-encoder output for each prompt; the same length L for the whole batch."""

    def encode_by_length(self, prompts: Sequence[str]) -> List[Tuple[List[int], PromptEncoding]]:
        """[(positions in `prompts`, their encoding)], one group per length. One batch encodes every prompt at
        its longest prompt's length, and the chunks a short prompt gets then change its embedding; in groups a
        prompt's scores do not depend on the prompts it was batched with. Only a batch longer than one chunk
        (a prompt over 75 tokens in it) costs more encoding: each prompt's own length is looked up."""
        enc = self.encode(list(prompts))
        if enc.embedding.shape[1] == CHUNK or len(prompts) == 1:
            return [(list(range(len(prompts))), enc)]
        lengths = [self.encode([p]).embedding.shape[1] for p in prompts]
        groups = []
        for length in sorted(set(lengths)):
            rows = [i for i, n in enumerate(lengths) if n == length]
            same = length == enc.embedding.shape[1]
            groups.append((rows, enc.rows(rows) if same else self.encode([prompts[i] for i in rows])))
        return groups

    def per_prompt(self, prompts: Sequence[str], work: Callable[[List[int], PromptEncoding], Sequence]) -> list:
        """`work(rows, encoding)` on each group of `encode_by_length`, returning one result per row of the group;
        the results back in the order of `prompts`."""
        out = [None] * len(prompts)
        for rows, cond in self.encode_by_length(prompts):
            for row, result in zip(rows, work(rows, cond)):
                out[row] = result
        return out

    def initial_x(self, noise: torch.Tensor) -> torch.Tensor:
        """x at the first step of a full-denoise run from unit Gaussian noise."""
        return noise * self.init_noise_sigma

    def guided(self, eps_c: torch.Tensor, eps_u: torch.Tensor, scale) -> torch.Tensor:
        """Classifier-free guidance as this model's pipeline combines the two predictions."""
        return eps_u + scale * (eps_c - eps_u)


def row_chunks(n: int, size: int):
    """Row indices 0..n-1 in consecutive groups of at most `size` (backward passes one group at a time)."""
    return [list(range(start, min(start + size, n))) for start in range(0, n, size)]


def rows_of_t(t, rows):
    """The timestep of `rows` as a fresh tensor (a host's schedule may be an inference-mode tensor, which autograd
    cannot save for the backward pass): one shared by the batch, or a per-image (B,) one cut to `rows`."""
    t = torch.as_tensor(t)
    return t[torch.as_tensor(rows, device=t.device)] if t.dim() and t.numel() > 1 else t.clone()


def gap_gradients(model: Denoiser, x, t, cond: PromptEncoding, eps_u, embedding, *, gap_of, weight=None,
                  grad_batch: int = 1, should_stop=None):
    """(gap per image (B,) float CPU, d gap / d embedding (B, L, C) float) with eps_u fixed.

    gap_of: eps_c - eps_u -> (B,) (raw L2 or RMS). weight: (B,) multiplier of each image's gap in the
    gradient (0 skips the backward pass of that image). The backward pass runs `grad_batch` images at a
    time: autograd keeps the UNet's activations of the images in flight, so peak memory grows with
    grad_batch, not with the batch (BENCHMARKS.md, memory).
    """
    n = embedding.shape[0]
    gaps = torch.empty(n)
    grad = torch.zeros(embedding.shape, dtype=torch.float32, device=embedding.device)
    for rows in row_chunks(n, grad_batch):
        check_stop(should_stop)
        sub = cond.rows(rows)
        index = torch.tensor(rows, device=x.device)
        wanted = weight is None or bool((weight[rows] != 0).any())
        e = embedding[rows].detach().clone().requires_grad_(wanted)
        with torch.enable_grad() if wanted else torch.no_grad():  # hosts sample under no_grad
            gap = gap_of(model.eps(x[index], rows_of_t(t, rows), e.to(embedding.dtype), sub.extra) - eps_u[index])
            if wanted:
                w = 1.0 if weight is None else weight[rows].to(gap.device, gap.dtype)
                # autograd.grad, not backward(): the host's weights must not collect .grad
                (g,) = torch.autograd.grad((gap * w).sum(), [e])
                grad[rows] = g.float()
        gaps[rows] = gap.detach().float().cpu()
        del gap, e
    return gaps, grad


class Interrupted(MemoGuardError, RuntimeError):
    """The user interrupted the generation: MemoGuard's own work stops, the host's sampler then stops too."""


def check_stop(should_stop) -> None:
    if should_stop is not None and should_stop():
        raise Interrupted("the generation was interrupted")


def is_out_of_memory(error: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(error, oom)) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def release_memory(error: Optional[BaseException] = None) -> None:
    """Free what a failed explanation or mitigation held: its frames (through the traceback), then the cache."""
    if error is not None:
        error.__traceback__ = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def in_batches(jobs: Sequence, batch_size: int, run: Callable[[Sequence], None],
               should_stop: Optional[Callable[[], bool]] = None) -> None:
    """run(part) over `jobs` in parts of at most `batch_size`. Out of memory halves the part and tries it again, down
    to one job, so a large model at a large size is explained at the batch its memory holds (a batch of re-encoded
    prompts of full-size SDXL at 1024 px does not fit beside the weights of a 24 GB card)."""
    start, size = 0, batch_size
    while start < len(jobs):
        check_stop(should_stop)
        part = jobs[start:start + size]
        try:
            run(part)
        except Exception as e:
            if size == 1 or not is_out_of_memory(e):
                raise
            release_memory(e)
            size = max(1, size // 2)
            continue
        start += len(part)


def expand_batch(value: torch.Tensor, batch: int) -> torch.Tensor:
    """A per-prompt tensor shared by the whole batch (leading size 1) -> `batch` rows."""
    return value.expand(batch, *value.shape[1:]) if value.shape[0] == 1 else value


def match_length(embedding: torch.Tensor, length: int) -> torch.Tensor:
    """Repeat an embedding whole to `length` tokens (a one-chunk uncond to the prompt's), as A1111 and ComfyUI do."""
    if embedding.shape[1] == length:
        return embedding
    if length % embedding.shape[1]:
        raise ValueError(f"cannot match an embedding of {embedding.shape[1]} tokens to {length}")
    return embedding.repeat(1, length // embedding.shape[1], 1)


def fit_shorter_prompt(embedding: torch.Tensor, length: int, empty_chunk: Callable[[], torch.Tensor]):
    """(embedding at `length` positions, padded) for a prompt re-encoded without words that lost 77-token chunks, so
    that cross-attention sees the prompt as if typed alone: repeated whole where its length divides `length`
    (attention over a sequence repeated whole is attention over the sequence, as ComfyUI's and Forge's CFG batch
    prompts of different lengths); else padded with the empty prompt's chunk (`empty_chunk()`, (1, 77, C)), as the
    WebUI pads the shorter prompts of a batch, which the prompt typed alone is not (padded True)."""
    short = embedding.shape[1]
    if short == length:
        return embedding, False
    if short > length:
        raise ValueError(f"a prompt re-encoded without words has {short} positions, more than {length}")
    if length % short == 0:
        return match_length(embedding, length), False
    pad = empty_chunk().to(embedding).repeat(embedding.shape[0], -(-(length - short) // CHUNK), 1)
    return torch.cat([embedding, pad], 1)[:, :length], True


def ddim_step(x: torch.Tensor, eps: torch.Tensor, coeff_now, coeff_next) -> torch.Tensor:
    """Deterministic DDIM update in any (alpha, sigma) convention."""
    (a, s), (a2, s2) = coeff_now, coeff_next
    x0 = (x - _col(s, x) * eps) / _col(a, x)
    return _col(a2, x) * x0 + _col(s2, x) * eps


def _col(v, like):
    return v.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1))) if isinstance(v, torch.Tensor) and v.dim() else v
