"""memoguard.DiffusionModel over a loaded ComfyUI model, so the core's explanation and mitigation run on it.

ComfyUI's timestep is sigma and its models return the denoised image at x = x0 + sigma*eps:
parameterization "x0", alpha = 1; a rectified flow (x = x0 + sigma*v) is read in the same form (memoguard.score).
ComfyUI executes nodes under torch.inference_mode(); gradients need `differentiable(...)` first
(memoguard.host_autograd, shared with the Forge adapter).

Every model whose text conditioning is `c_crossattn` is encoded, scored and calibrated (SD1.x, SD2.x, SDXL, SD3,
Flux, Chroma, Qwen-Image). Its other inputs (SDXL's y, Flux's pooled text and guidance) come from the model's own
`extra_conds`, as the sampler builds them, and ride along unoptimised. Explanation and mitigation also need the
words behind each position: known where the conditioning is laid out as the tokenizer's CLIP chunks (SD1.x, SD2.x,
SDXL, a DiT fed by a CLIP); other layouts (T5 beside CLIP, an LLM encoder's chat template) are refused with the
reason.
"""
import math
from dataclasses import dataclass
from typing import List, NamedTuple, Optional

import torch

from memoguard import DiffusionModel, PromptEncoding
from memoguard.model import word_numbers
from memoguard.errors import MemoGuardError
from memoguard.host_autograd import ordinary
from memoguard.hosts import CHUNK, coefficients_kdiffusion

from .calibration_choice import prediction_of

SUPPORTED = "models whose text conditioning is c_crossattn (SD1.x, SD2.x, SDXL, SD3, Flux, Chroma, Qwen-Image)"
WORDS_SUPPORTED = "conditionings laid out as the tokenizer's CLIP chunks (SD1.x, SD2.x, SDXL, a DiT fed by a CLIP)"
CROSSATTN = "c_crossattn"  # the model_conds entry holding the text-encoder output
CONSTANT = "memoguard_constant:"  # prefix of an extra that is one number for the model (split_model_conds)
PROMPT_SOURCE = "memoguard_prompt"  # the CONDITIONING option MemoGuard Text Encode adds: where it came from


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


def _without(chunks, drop: set, pad):
    """Tokenized chunks with the tokens at positions `drop` left out, each chunk closed by its end token and padded
    to its length with `pad`."""
    out, position = [], 0
    for chunk in chunks:
        kept = [t for i, t in enumerate(chunk, position) if t[2] > 0 and i not in drop]
        end = next(t for t in chunk[1:] if t[2] == 0)
        out.append([chunk[0], *kept, end] + [pad] * (len(chunk) - len(kept) - 2))
        position += len(chunk)
    return out


class _Layout(NamedTuple):
    """Where a tokenization's prompt lies: each position's token text, prompt and BOS masks, ids, word numbers."""
    tokens: List[str]
    prompt_mask: torch.Tensor
    frozen_mask: torch.Tensor
    ids: torch.Tensor
    words: List[int]


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
        """The prompt tokenized again by the CLIP (its weights syntax, embeddings and chunks), the tokens at the
        left-out positions dropped from their chunk, the chunk closed and padded again; every other token keeps its
        weight. The row's prompt_type is "positive" (the explained and mitigated prompt)."""
        if cond.texts is None:
            raise ValueError("this encoding carries no prompt text (it was not made by encode())")
        pads = {key: chunks[0][-1] for key, chunks in self._tokenize("").items()}  # each encoder's padding token
        rows = []
        for row, drop in edits:
            tokens = self._tokenize(cond.texts[row])
            rows.append(self._encode_tokens({key: _without(chunks, set(drop), pads[key])
                                             for key, chunks in tokens.items()}, cond.texts[row], "positive"))
        if any(r.embedding.shape[1] != cond.embedding.shape[1] for r in rows):
            raise UnsupportedModel("a prompt re-encoded without a word changed its length: supported are "
                                   f"{WORDS_SUPPORTED}")
        return self._batch(rows)

    def _tokenize(self, text: str) -> dict:
        """{encoder key: chunks of (token, weight, word id)}: word id 0 marks BOS, EOS and padding."""
        return self.clip.tokenize(text, return_word_ids=True)

    def _encode_one(self, text: str, prompt_type: str) -> "_Row":
        return self._encode_tokens(self._tokenize(text), text, prompt_type)

    def _encode_tokens(self, tokens: dict, text: str, prompt_type: str) -> "_Row":
        plain = {k: [[(tok, w) for tok, w, _ in chunk] for chunk in chunks] for k, chunks in tokens.items()}
        cond, options = self.clip.encode_from_tokens_scheduled(plain)[0]
        embedding, extra = split_model_conds(self._model_conds(cond, options, prompt_type))
        try:
            layout = self._layout(tokens, embedding.shape[1])
        except UnsupportedModel:
            if self.words:
                raise
            none = torch.zeros(embedding.shape[1], dtype=torch.bool)  # the words are unknown: no prompt positions
            layout = _Layout([""] * embedding.shape[1], none, none.clone(), None, [-1] * embedding.shape[1])
        return _Row(embedding, layout.tokens, layout.prompt_mask, layout.frozen_mask, extra, layout.ids, layout.words,
                    text)

    def _layout(self, tokens: dict, length: int) -> _Layout:
        """The words behind the conditioning's `length` positions, from the first tokenizer ("l" for SD1; SDXL's
        "g" has the same positions); UnsupportedModel where they are not laid out so."""
        key = next(iter(tokens))
        pairs = [p for chunk in tokens[key] for p in chunk]
        if len(pairs) != length:
            raise UnsupportedModel(
                f"this model's text encoder ({'+'.join(tokens)}) gives {length} positions and its tokenizer "
                f"{key!r} {len(pairs)}: MemoGuard maps words to positions in {WORDS_SUPPORTED} (the Monitor and "
                "calibration work on every model)")
        names = [name for _, name in self.clip.tokenizer.untokenize([(tok, w) for tok, w, _ in pairs])]
        in_prompt = [wid > 0 for _, _, wid in pairs]
        # an embedding's vectors (textual inversion) have no id: -1
        ids = torch.tensor([tok if isinstance(tok, int) else -1 for tok, _, _ in pairs])
        return _Layout([n.replace("</w>", "") for n in names], torch.tensor(in_prompt),
                       torch.arange(len(pairs)) % CHUNK == 0, ids,
                       word_numbers([n.endswith("</w>") for n in names], in_prompt))

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

    def _model_conds(self, cond, options: dict, prompt_type: str) -> dict:
        """The model inputs the sampler would build from this CONDITIONING entry (encode_model_conds)."""
        if self.noise is None:
            raise ValueError("encode() needs the sampler-shaped noise (ComfyDiffusionModel(..., noise=...))")
        noise = self.noise
        params = {**options, "cross_attn": cond, "device": noise.device, "noise": noise,
                  "width": options.get("width", noise.shape[-1] * 8), "height": options.get("height", noise.shape[-2] * 8),
                  "prompt_type": options.get("prompt_type", prompt_type)}
        return self.base.extra_conds(**params)
