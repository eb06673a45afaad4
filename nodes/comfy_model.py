"""memoguard.DiffusionModel over a loaded ComfyUI model, so the core's explanation and mitigation run on it.

ComfyUI's timestep is sigma and its models return the denoised image at x = x0 + sigma*eps:
parameterization "x0", alpha = 1; a rectified flow (x = x0 + sigma*v) is read in the same form (memoguard.score).
ComfyUI executes nodes under torch.inference_mode(); gradients need `differentiable(...)` first
(memoguard.host_autograd, shared with the Forge adapter).

Every model whose text conditioning is `c_crossattn` is encoded, scored and calibrated (SD1.x, SD2.x, SDXL, SD3,
Flux, Chroma, Qwen-Image, Flux.2, Z-Image). Its other inputs (SDXL's y, Flux's pooled text and guidance, Z-Image's
token count) come from the model's own `extra_conds`, as the sampler builds them, and ride along unoptimised.
Explanation and mitigation also need the words behind each position: known where the positions are one CLIP's
77-token chunks (SD1.x, SD2.x, SDXL, a DiT fed by a CLIP), one T5's tokens (Flux) or a CLIP's followed by a T5's
(SD3); a word is then its pieces in every tokenizer's stream. Other layouts (an LLM encoder's chat template, Flux.2's
512 padded positions, Chroma's unpadded T5 once a word is left out) are refused with the reason.
"""
import math
from dataclasses import dataclass, replace
from typing import List, NamedTuple, Optional

import torch

from memoguard import DiffusionModel, PromptEncoding
from memoguard.errors import MemoGuardError
from memoguard.model import WORD_START, fit_shorter_prompt, sentencepiece_word_ends, word_numbers
from memoguard.host_autograd import ordinary
from memoguard.hosts import CHUNK, coefficients_kdiffusion, cut_out

from .calibration_choice import prediction_of

SUPPORTED = "models whose text conditioning is c_crossattn (SD1.x, SD2.x, SDXL, SD3, Flux, Chroma, Qwen-Image)"
WORDS_SUPPORTED = ("conditionings laid out as a CLIP's or T5's tokens (SD1.x, SD2.x, SDXL, SD3 and Flux with their "
                   "own encoders, a DiT fed by a CLIP)")
CROSSATTN = "c_crossattn"  # the model_conds entry holding the text-encoder output
CONSTANT = "memoguard_constant:"  # prefix of an extra that is one number for the model (split_model_conds)
PROMPT_SOURCE = "memoguard_prompt"  # the CONDITIONING option MemoGuard Text Encode adds: where it came from
CLIP_STREAMS = ("l", "g", "h")  # ComfyUI's tokenizer keys of CLIP BPE streams; T5 streams' keys contain "t5"


class UnsupportedModel(MemoGuardError, ValueError):
    """A model whose conditioning MemoGuard cannot read, or whose positions it cannot map to the prompt's words."""


def interrupted() -> bool:
    """ComfyUI's interrupt flag (the queue's Cancel): MemoGuard's loops stop with the sampler."""
    from comfy import model_management
    return model_management.processing_interrupted()


@dataclass(frozen=True)
class PromptSource:
    """The text and CLIP a conditioning was encoded from (carried in its options; the sampler copies them along)."""
    text: str
    clip: object


def with_prompt_source(conditioning: list, text: str, clip) -> list:
    """A CONDITIONING whose entries carry the prompt they were encoded from."""
    return [[cond, {**options, PROMPT_SOURCE: PromptSource(text, clip)}] for cond, options in conditioning]


def prompt_source(entry: dict) -> Optional[PromptSource]:
    """The prompt a sampler's conditioning entry was encoded from, where MemoGuard Text Encode made it."""
    source = entry.get(PROMPT_SOURCE)
    return source if isinstance(source, PromptSource) else None


def split_model_conds(model_conds: dict):
    """(text-encoder output, the other model inputs such as SDXL's y) from a conditioning's model_conds. A number
    (Lumina 2's and Z-Image's num_tokens, a CONDConstant) rides along as a (1,) tensor under CONSTANT + its name, so
    that the core batches it like the tensors; raw_prediction hands the model the number back."""
    if CROSSATTN not in model_conds:
        raise UnsupportedModel(f"this model's conditioning has no {CROSSATTN} (has {sorted(model_conds)}): "
                               f"supported are {SUPPORTED}")
    extra = {}
    for key, value in model_conds.items():
        if key == CROSSATTN:
            continue
        if isinstance(value.cond, torch.Tensor):
            extra[key] = ordinary(value.cond)
        elif isinstance(value.cond, (bool, int, float)):
            extra[CONSTANT + key] = torch.tensor([value.cond])
        else:
            raise UnsupportedModel(f"this model's conditioning input {key!r} is a {type(value.cond).__name__}: "
                                   f"supported are {SUPPORTED}")
    return ordinary(model_conds[CROSSATTN].cond), extra


def model_inputs(extra: dict) -> dict:
    """The model's keyword inputs from an encoding's extra: each constant one number again (a batch holds one)."""
    out = {}
    for key, value in extra.items():
        if key.startswith(CONSTANT):
            if value.unique().numel() != 1:
                raise UnsupportedModel(f"{key[len(CONSTANT):]} differs within one batch: {value.tolist()}")
            value = value.reshape(-1)[0].item()
            key = key[len(CONSTANT):]
        out[key] = value
    return out


def _same_tokens(a: list, b: list) -> bool:
    """Whether two lists of (token, weight) are the same: ids equal, or an embedding's vectors equal."""
    same = lambda x, y: (torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
                         else not isinstance(x, torch.Tensor) and not isinstance(y, torch.Tensor) and x == y)
    return len(a) == len(b) and all(same(x, y) and v == w for (x, v), (y, w) in zip(a, b))


def _without(chunks, drop: set, pad):
    """Tokenized chunks with the tokens at positions `drop` left out, each chunk (CLIP's opened by its BOS) closed by
    its end token and padded to its length with `pad` (None: a tokenizer that does not pad, e.g. Chroma's T5)."""
    out, position = [], 0
    for chunk in chunks:
        bos = chunk[:1] if chunk[0][2] == 0 else []  # T5 has no BOS: its first token is the prompt's
        kept = [t for i, t in enumerate(chunk, position) if t[2] > 0 and i not in drop]
        end = next(t for t in chunk[len(bos):] if t[2] == 0)
        padding = [] if pad is None else [pad] * (len(chunk) - len(kept) - len(bos) - 1)
        out.append([*bos, *kept, end, *padding])
        position += len(chunk)
    return out


class _Stream(NamedTuple):
    """One tokenizer's tokens of a prompt, flattened: (token, weight, ComfyUI word id) each, its pieces' names, and
    each token's word number (memoguard.model.word_numbers)."""
    pairs: list
    names: List[str]
    words: List[int]


class _Layout(NamedTuple):
    """Where a tokenization's prompt lies: each position's token text, prompt and BOS masks, ids, word numbers, and
    how many leading positions are a CLIP's chunks (all of them without a T5 stream; None where T5 comes alone)."""
    tokens: List[str]
    prompt_mask: torch.Tensor
    frozen_mask: torch.Tensor
    ids: torch.Tensor
    words: List[int]
    clip_positions: Optional[int]


class _Row(NamedTuple):
    """One prompt's encoding, before batching."""
    embedding: torch.Tensor
    tokens: List[str]
    prompt_mask: torch.Tensor
    frozen_mask: torch.Tensor
    extra: dict
    ids: torch.Tensor
    words: List[int]
    text: str


class ComfyDiffusionModel(DiffusionModel):
    """A ComfyUI BaseModel (ModelPatcher.model) with a sampling schedule and, for encode(), a CLIP.

    noise: the sampler-shaped noise; encode() derives SDXL's size conditioning from it exactly as
    the sampler does (comfy.samplers.encode_model_conds: width/height = latent size x 8).
    words: whether encode() must map positions to the prompt's words (explanation, mitigation); a calibration
    needs only the conditioning, so any text encoder serves it.
    """

    parameterization = "x0"
    reencodes = True  # from the prompt text, through the CLIP (encode_without)

    def __init__(self, base_model, sigmas: Optional[torch.Tensor] = None, clip=None,
                 noise: Optional[torch.Tensor] = None, device=None, words: bool = True):
        self.base = base_model
        self.sigmas = sigmas
        self.clip = clip
        self.noise = noise
        self.device = device  # where encode() puts the conditioning (CLIP outputs land on the CPU)
        self.prediction = prediction_of(base_model)  # what the checkpoint predicts, for calibrations
        self.words = words

    def raw_prediction(self, x, t, embedding, extra):
        return self.base.apply_model(x, t, c_crossattn=embedding, **model_inputs(extra))

    def coefficients(self, t):
        return coefficients_kdiffusion(t)

    def timesteps(self, steps: int) -> torch.Tensor:
        if self.sigmas is None or len(self.sigmas) - 1 != steps:
            raise ValueError(f"this model was set up with a {0 if self.sigmas is None else len(self.sigmas) - 1}"
                             f"-step schedule, not {steps}")
        return self.sigmas[:-1]

    def initial_x(self, noise: torch.Tensor) -> torch.Tensor:
        """x at the first sigma, scaled exactly as ComfyUI's KSampler scales a txt2img start (its
        max_denoise: sqrt(1 + sigma^2) only when the schedule starts at the model's sigma_max)."""
        sigma = self.sigmas[:1].to(noise.device)
        sigma_max = float(self.base.model_sampling.sigma_max)
        first = float(sigma[0])
        max_denoise = math.isclose(sigma_max, first, rel_tol=1e-05) or first > sigma_max
        return self.base.model_sampling.noise_scaling(sigma, noise, torch.zeros_like(noise), max_denoise=max_denoise)

    def encode(self, prompts: List[str], prompt_type: str = "positive") -> PromptEncoding:
        """prompt_type: the sampler input the prompts stand for (some models, e.g. SDXL's refiner, differ)."""
        rows = [self._encode_one(p, prompt_type) for p in prompts]
        if any(r.embedding.shape[1] != rows[0].embedding.shape[1] for r in rows):
            raise ValueError("prompts of different lengths (in 77-token chunks) cannot be batched")
        return self._batch(rows)

    def encode_by_length(self, prompts):
        """ComfyUI encodes one prompt at a time: the groups come from each prompt's own length."""
        rows = [self._encode_one(p, "positive") for p in prompts]
        lengths = [r.embedding.shape[1] for r in rows]
        return [([i for i, n in enumerate(lengths) if n == length],
                 self._batch([r for r, n in zip(rows, lengths) if n == length])) for length in sorted(set(lengths))]

    def encode_without(self, cond: PromptEncoding, edits) -> PromptEncoding:
        """The prompt typed without the words at the left-out positions, one row per edit at cond's length: its text
        with those words cut out, tokenized and encoded by the CLIP as ComfyUI encodes any prompt (its weights syntax,
        embeddings and 77-token chunks, so the words after a cut one move up a chunk). One that lost a chunk comes
        back to cond's length by memoguard.model.fit_shorter_prompt: repeated whole, as ComfyUI's CFG batches
        prompts of different lengths, else padded and marked. Where the cut text does not tokenize to the prompt's
        tokens less the word's (text the tokenizer normalises, e.g. an HTML entity), the tokens are left out in
        place, each chunk closed and padded again, and a prompt of several chunks is marked padded (typed alone
        it would be chunked otherwise)."""
        if cond.texts is None or cond.words is None:
            raise ValueError("this encoding carries no prompt text (it was not made by encode())")
        length = cond.embedding.shape[1]
        empty = lambda: self._encode_one("", "positive").embedding
        rows, padded = [], []
        for row, drop in edits:
            text = cond.texts[row]
            left_out = {cond.words[row][i] for i in drop} - {-1}
            tokens = self._tokenize(text)
            streams = self._streams(tokens)
            cut = self._typed_without(text, cond.tokens[row], cond.words[row], left_out, streams)
            encoded = None if cut is None else self._encode_tokens(cut[1], cut[0], "positive")
            if encoded is not None and encoded.embedding.shape[1] < length and self._layout(
                    tokens, length).clip_positions == length:  # CLIP chunks alone (SD1, SDXL): one was lost
                embedding, was_padded = fit_shorter_prompt(encoded.embedding, length, empty)
                encoded = encoded._replace(embedding=embedding)
            elif encoded is None or encoded.embedding.shape[1] != length:
                pads = {key: chunks[0][-1] if len(chunks[0]) > 1 else None  # each encoder's padding (None: unpadded)
                        for key, chunks in self._tokenize("").items()}
                edited = {key: _without(chunks, {i for i, w in enumerate(streams[key].words) if w in left_out},
                                        pads[key]) if key in streams else chunks
                          for key, chunks in tokens.items()}
                encoded = self._encode_tokens(edited, text, "positive")
                was_padded = any(len(tokens[key]) > 1 for key in streams)
            else:
                was_padded = False
            rows.append(encoded)
            padded.append(was_padded)
        if any(r.embedding.shape[1] != length for r in rows):
            raise UnsupportedModel("a prompt re-encoded without a word changed its length: supported are "
                                   f"{WORDS_SUPPORTED}")
        embedding = torch.cat([r.embedding for r in rows])
        extra = {k: torch.cat([r.extra[k] for r in rows]) for k in rows[0].extra}
        if self.device is not None:
            embedding, extra = embedding.to(self.device), {k: v.to(self.device) for k, v in extra.items()}
        sub = cond.rows([row for row, _ in edits])
        return replace(sub.with_embedding(embedding), extra=extra, padded=padded if any(padded) else None)

    def _typed_without(self, text: str, tokens: List[str], words: List[int], left_out: set, streams: dict):
        """(text, its tokenization) of `text` with the words numbered `left_out` cut out (memoguard.hosts.cut_out),
        or None where a word is not found in the text as its pieces spell it, or the cut text does not tokenize to
        the prompt's tokens less the word's in every stream (the same tokens and weights, in order)."""
        spelled = {}
        for position, word in enumerate(words):
            if word >= 0:
                spelled[word] = spelled.get(word, "") + tokens[position]
        lower, spans, at = text.lower(), {}, 0
        for word in sorted(spelled):
            start = lower.find(spelled[word].lower(), at) if spelled[word] else -1
            if start < 0:
                return None
            at = start + len(spelled[word])
            spans[word] = (start, at)
        cut = cut_out(text, [spans[w] for w in left_out])
        retokenized = self._tokenize(cut)
        again = self._streams(retokenized)
        for key, stream in streams.items():
            kept = [(tok, weight) for (tok, weight, seg), word in zip(stream.pairs, stream.words)
                    if seg > 0 and word not in left_out]
            if key not in again or not _same_tokens(kept, [(t, w) for t, w, seg in again[key].pairs if seg > 0]):
                return None
        return cut, retokenized

    def _tokenize(self, text: str) -> dict:
        """{encoder key: chunks of (token, weight, word id)}: word id 0 marks BOS, EOS and padding."""
        return self.clip.tokenize(text, return_word_ids=True)

    def _encode_one(self, text: str, prompt_type: str) -> "_Row":
        return self._encode_tokens(self._tokenize(text), text, prompt_type)

    def _encode_tokens(self, tokens: dict, text: str, prompt_type: str) -> "_Row":
        plain = {k: [[(tok, w) for tok, w, _ in chunk] for chunk in chunks] for k, chunks in tokens.items()}
        cond, options = self.clip.encode_from_tokens_scheduled(plain)[0]
        embedding, extra = self.conditioning_inputs(cond, options, prompt_type)
        try:
            layout = self._layout(tokens, embedding.shape[1])
        except UnsupportedModel:
            if self.words:
                raise
            none = torch.zeros(embedding.shape[1], dtype=torch.bool)  # the words are unknown: no prompt positions
            layout = _Layout([""] * embedding.shape[1], none, none.clone(), None, [-1] * embedding.shape[1], False)
        return _Row(embedding, layout.tokens, layout.prompt_mask, layout.frozen_mask, extra, layout.ids, layout.words,
                    text)

    def _streams(self, tokens: dict) -> dict:
        """{key: _Stream} of the CLIP and T5 streams this CLIP's text encoder reads (SD3 loaded without T5 ignores
        its T5 stream), with their words."""
        tokenizer, encoder = self.clip.tokenizer, getattr(self.clip, "cond_stage_model", None)
        out = {}
        for key, chunks in tokens.items():
            t5 = "t5" in key
            if not (t5 or key in CLIP_STREAMS):
                continue
            modules = [getattr(encoder, name) for name in (key, f"clip_{key}") if hasattr(encoder, name)]
            if modules and all(m is None for m in modules):
                continue  # the tokenizer makes the stream, the loaded encoder has no model for it
            own = next((getattr(tokenizer, name) for name in (key, f"clip_{key}") if hasattr(tokenizer, name)),
                       tokenizer)
            pairs = [p for chunk in chunks for p in chunk]
            names = [name for _, name in own.untokenize([(tok, w) for tok, w, _ in pairs])]
            segments = [seg for _, _, seg in pairs]
            ends = sentencepiece_word_ends(names, segments) if t5 else [n.endswith("</w>") for n in names]
            out[key] = _Stream(pairs, names, word_numbers(ends, [seg > 0 for seg in segments]))
        return out

    def _layout(self, tokens: dict, length: int) -> _Layout:
        """The words behind the conditioning's `length` positions. They are one CLIP stream's (SD1; SDXL's two share
        their positions; SD3 without T5), a T5 stream's (Flux, Chroma), or a CLIP's followed by a T5's (SD3); a word
        is the same in every stream (the n-th word of each), its text from the first. UnsupportedModel where the
        conditioning is laid out otherwise, or the tokenizers split the prompt into different words."""
        streams = self._streams(tokens)
        clip, t5 = [k for k in streams if k in CLIP_STREAMS], [k for k in streams if k not in CLIP_STREAMS]
        options = ([[clip[0], t5[0]]] if clip and t5 else []) + ([[t5[0]]] if t5 else []) + ([[clip[0]]] if clip else [])
        feeding = next((o for o in options if sum(len(streams[k].pairs) for k in o) == length), None)
        if feeding is None:
            raise UnsupportedModel(
                f"this model's text encoder ({'+'.join(tokens)}) gives {length} positions, which are not its "
                f"tokenizers' tokens ({', '.join(f'{k} {len(s.pairs)}' for k, s in streams.items()) or 'none'}): "
                f"MemoGuard maps words to positions in {WORDS_SUPPORTED} (the Monitor and calibration work on every "
                "model)")
        counts = {k: max(s.words, default=-1) + 1 for k, s in streams.items()}
        if len(set(counts.values())) > 1:
            raise UnsupportedModel(f"this prompt's tokenizers split it into different numbers of words ({counts}): "
                                   "no word can be left out of all of them alike")
        text, prompt, frozen, ids, words = [], [], [], [], []
        for n, key in enumerate(feeding):
            s, bos = streams[key], key in CLIP_STREAMS  # CLIP opens each 77-token chunk with BOS
            for i, ((tok, _, _), name, word) in enumerate(zip(s.pairs, s.names, s.words)):
                text.append("" if n else name.replace("</w>", "").replace(WORD_START, ""))
                prompt.append(word >= 0)
                frozen.append(bos and i % CHUNK == 0)
                ids.append(tok if isinstance(tok, int) else -1)  # an embedding's vectors (textual inversion): -1
                words.append(word)
        return _Layout(text, torch.tensor(prompt), torch.tensor(frozen), torch.tensor(ids), words,
                       len(streams[feeding[0]].pairs) if feeding[0] in CLIP_STREAMS else None)

    def clip_positions_of(self, text: str, length: int) -> Optional[int]:
        """How many leading positions of a conditioning of `length` positions that encodes `text` are a CLIP's
        77-token chunks (SD1, SDXL: all; SD3: those before T5's), None where none are: padding masking's premise
        (CLIP pads a prompt with copies of its end token)."""
        return self._layout(self._tokenize(text), length).clip_positions

    def prompt_encoding(self, text: str, embedding: torch.Tensor, extra: dict,
                        check: bool) -> Optional[PromptEncoding]:
        """A sampler's positive conditioning (B, L, C) as the encoding of `text`: its tokens, words and prompt
        positions from the CLIP's tokenizer (UnsupportedModel where its length is not the tokenizer's). check: also
        encode `text` and require the conditioning to be that, else None (token removal re-encodes the text: a
        conditioning a node changed on the way is not the text's)."""
        tokens = self._tokenize(text)
        layout = self._layout(tokens, embedding.shape[1])
        if check:
            own = self._encode_tokens(tokens, text, "positive").embedding.to(embedding)
            if not torch.allclose(own[0], embedding[0], rtol=1e-3, atol=1e-4):
                return None
        b = embedding.shape[0]
        rows = lambda t: t.expand(b, -1).clone()
        extra = {k: v.expand(b, *v.shape[1:]) if v.shape[0] == 1 else v for k, v in extra.items()}
        return PromptEncoding(embedding, [layout.tokens] * b, rows(layout.prompt_mask), rows(layout.frozen_mask),
                              extra, rows(layout.ids), [layout.words] * b, [text] * b)

    def _batch(self, rows: List["_Row"]) -> PromptEncoding:
        extra = {k: torch.cat([r.extra[k] for r in rows]) for k in rows[0].extra}
        embedding = torch.cat([r.embedding for r in rows])
        if self.device is not None:
            embedding, extra = embedding.to(self.device), {k: v.to(self.device) for k, v in extra.items()}
        ids = None if any(r.ids is None for r in rows) else torch.stack([r.ids for r in rows])  # None: cannot re-encode
        return PromptEncoding(embedding, [r.tokens for r in rows], torch.stack([r.prompt_mask for r in rows]),
                              torch.stack([r.frozen_mask for r in rows]), extra, ids, [r.words for r in rows],
                              [r.text for r in rows])

    def conditioning_inputs(self, cond: torch.Tensor, options: dict, prompt_type: str = "positive"):
        """(text-encoder output, other model inputs) of one CONDITIONING entry, as the sampler hands them over."""
        return split_model_conds(self._model_conds(cond, options, prompt_type))

    def _model_conds(self, cond, options: dict, prompt_type: str) -> dict:
        """The model inputs the sampler would build from this CONDITIONING entry (encode_model_conds)."""
        if self.noise is None:
            raise ValueError("encode() needs the sampler-shaped noise (ComfyDiffusionModel(..., noise=...))")
        noise = self.noise
        params = {**options, "cross_attn": cond, "device": noise.device, "noise": noise,
                  "width": options.get("width", noise.shape[-1] * 8), "height": options.get("height", noise.shape[-2] * 8),
                  "prompt_type": options.get("prompt_type", prompt_type)}
        return self.base.extra_conds(**params)
