"""The WebUI's own model call as a `memoguard.model.DiffusionModel`, for explanation and mitigation.

The adapter goes through the CFG denoiser's inner model (the very wrapper the sampler calls), so
v-prediction, SDXL's dict conditioning and the sampler family's output convention are handled
by the WebUI itself. It evaluates one step at a time, at the x and sigma of the running sampler;
the prompt embedding is the conditioning tensor the sampler is about to use (weights, textual
inversion and long-prompt chunks already applied).
"""
from contextlib import contextmanager
from dataclasses import replace
from typing import List, Optional

import torch

from memoguard.hosts import (WebUIPromptText, chunked_encoding, coefficients_kdiffusion, coefficients_vp,
                             empty_encoding, merge_embedding_words)
from memoguard.model import Denoiser, PromptEncoding, word_numbers

KDIFFUSION = "k-diffusion"  # outputs denoised x0 at noise level sigma
TIMESTEPS = "timesteps"     # DDIM / PLMS / UniPC: outputs eps, `sigma` holds the timestep


def sampler_family(denoiser) -> str:
    from modules.sd_samplers_timesteps import CFGDenoiserTimesteps
    return TIMESTEPS if isinstance(denoiser, CFGDenoiserTimesteps) else KDIFFUSION


def cond_embedding(cond) -> torch.Tensor:
    """The cross-attention tensor of a conditioning: SD1/SD2 tensor, SDXL's or Flux's {'crossattn', 'vector', ...},
    or a text engine's list of one (1, L, C) tensor a prompt (Forge Neo's Anima)."""
    if isinstance(cond, dict):
        return cond["crossattn"]
    if isinstance(cond, (list, tuple)):
        return torch.cat([c if c.dim() == 3 else c[None] for c in cond])
    return cond


def with_embedding(cond, embedding: torch.Tensor, vector: Optional[torch.Tensor] = None):
    """The same conditioning with its cross-attention tensor (and SDXL's vector, where given) replaced (the dict is
    rebuilt per step)."""
    current = cond_embedding(cond)
    if current.shape != embedding.shape:
        raise ValueError(f"the prompt conditioning changed shape during sampling ({tuple(embedding.shape)} -> "
                         f"{tuple(current.shape)}, prompt editing?); the mitigated prompt is not applied at this step")
    if isinstance(cond, dict):
        cond["crossattn"] = embedding
        if vector is not None:
            cond["vector"] = vector.to(cond["vector"])
        return cond
    return embedding


class ReencodesPrompts:
    """A WebUI model that re-encodes its prompts through the host (`prompt_text`) where `reencodable` allowed it."""
    reencodes = True
    prompt_text: Optional[WebUIPromptText] = None
    reencode_note = ""  # why the prompts are not re-encoded (reencodable)

    def can_reencode(self, cond: PromptEncoding) -> bool:
        return self.prompt_text is not None and cond.texts is not None

    def encode_without(self, cond: PromptEncoding, edits) -> PromptEncoding:
        return self.prompt_text.encode_without(cond, edits)

    def reencodable(self, cond: PromptEncoding, prompt_text: WebUIPromptText) -> PromptEncoding:
        """cond with its texts where the host re-encodes them to the sampler's conditioning, else without (and
        the reason in `reencode_note`)."""
        self.prompt_text = prompt_text
        self.reencode_note = prompt_text.mismatch(cond, cond.texts) or ""
        return replace(cond, texts=None) if self.reencode_note else cond


def split_words(tokenizer, chunker=None):
    """The tokenizer's word split: CLIP's pre-tokenizer pattern (HF's slow CLIPTokenizer and OpenCLIP keep it as
    `pat`), or a fast tokenizer's pre-tokenizer (its pieces as spans of the text). With the WebUI's prompt
    chunker, a textual-inversion embedding's name is one word, as the chunker finds it
    (memoguard.hosts.merge_embedding_words)."""
    pattern = getattr(tokenizer, "pat", None)
    if pattern is not None:
        split = pattern.findall
    else:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or backend.pre_tokenizer is None:
            raise ValueError(f"{type(tokenizer).__name__} has no word pattern")
        split = lambda text: [text[a:b] for _, (a, b) in backend.pre_tokenizer.pre_tokenize_str(text)]
    database = embedding_database(chunker)
    if database is None:
        return split
    return lambda text: merge_embedding_words(split(text), chunker.tokenize, database.find_embedding_at_position)


def embedding_database(chunker):
    """The textual-inversion embeddings the WebUI's prompt chunker looks names up in: A1111's model_hijack's
    (`chunker.hijack.embedding_db`), Forge's and Forge Neo's text engine's own (`chunker.embeddings`); None without."""
    database = getattr(chunker, "embeddings", None) or getattr(getattr(chunker, "hijack", None), "embedding_db", None)
    return database if hasattr(database, "find_embedding_at_position") else None


def a1111_prompt_text(p, chunker) -> WebUIPromptText:
    """A1111's emphasis parser (off when opts.emphasis is "None") and its model's get_learned_conditioning at the
    first pass's size (SDXL's size conditioning)."""
    from modules import prompt_parser, shared
    literal = getattr(shared.opts, "emphasis", "Original") == "None"

    def encode(texts):
        with torch.no_grad():
            cond = p.sd_model.get_learned_conditioning(prompt_parser.SdConditioning(texts, width=p.width,
                                                                                    height=p.height))
        return (cond["crossattn"], {"vector": cond["vector"]}) if isinstance(cond, dict) else (cond, {})

    parse = (lambda text: [(text, 1.0)]) if literal else prompt_parser.parse_prompt_attention
    return WebUIPromptText(parse, split_words(chunker_tokenizer(chunker), chunker), encode, escape=not literal)


class WebUIModel(ReencodesPrompts, Denoiser):
    """The sampler's model call at its current step; explanation and mitigation pass that step's t."""
    def __init__(self, denoiser, family: str):
        sd_model = denoiser.p.sd_model
        if getattr(getattr(sd_model, "model", None), "conditioning_key", None) == "crossattn-adm":
            raise ValueError("unCLIP checkpoints are not supported by token explanation and mitigation")
        self.inner = denoiser.inner_model
        self.family = family
        self.parameterization = "x0" if family == KDIFFUSION else "eps"
        self.alphas_cumprod = sd_model.alphas_cumprod

    def raw_prediction(self, x, t, embedding, extra):
        if "vector" in extra:  # SDXL
            cond = {"crossattn": embedding, "vector": extra["vector"], "c_concat": [extra["image_cond"]]}
        else:
            cond = {"c_crossattn": [embedding], "c_concat": [extra["image_cond"]]}
        return self.inner(x, t, cond=cond)

    def coefficients(self, t):
        if self.family == KDIFFUSION:
            return coefficients_kdiffusion(t)
        return coefficients_vp(self.alphas_cumprod.to(t.device), t)


@contextmanager
def frozen_parameters(module):
    """Keep autograd off the host's weights while MemoGuard differentiates w.r.t. the prompt only."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _rows_of(value, index: list):
    if isinstance(value, dict):
        return {k: v[index] for k, v in value.items()}
    return value[index]


def prompt_encodings(p, params, layout, iteration: int):
    """(cond, uncond) PromptEncodings, one row per cond row of this CFG call (uncond row of its image); cond.texts:
    each row's text at the first step (not yet checked: ReencodesPrompts.reencodable)."""
    n_rows = sum(len(rows) for rows in layout)
    batch = len(layout)
    image_of_row = [i for i, rows in enumerate(layout) for _ in rows]
    emb = cond_embedding(params.text_cond).detach()
    uncond = _rows_of(params.text_uncond, image_of_row)
    uncond_emb = cond_embedding(uncond).detach()
    image_cond = params.image_cond
    cond_extra = {"image_cond": image_cond[:n_rows]}
    uncond_extra = {"image_cond": image_cond[-batch:][image_of_row]}
    if isinstance(params.text_cond, dict):
        cond_extra["vector"] = params.text_cond["vector"].detach()
        uncond_extra["vector"] = uncond["vector"].detach()
    clip = prompt_chunker(webui_clip())
    tokens, prompt_mask, words, texts = row_tokens(p, layout, iteration, emb.shape[1], clip, chunker_tokenizer(clip))
    cond = replace(chunked_encoding(emb, tokens, prompt_mask, cond_extra, words), texts=texts)
    return cond, empty_encoding(uncond_emb, uncond_extra)


def webui_clip():
    from modules.sd_hijack import model_hijack
    return model_hijack.clip


def webui_chunker():
    """A1111's prompt chunker (its tokenizer: chunker_tokenizer)."""
    return prompt_chunker(webui_clip())


def prompt_chunker(clip):
    """The WebUI's CLIP prompt chunker. SDXL: model_hijack.clip is sgm's GeneralConditioner (no tokenize_line,
    an empty `wrapped`); its first text embedder, CLIP-L, holds the HF tokenizer and chunks prompts at the
    positions OpenCLIP-G uses."""
    if hasattr(clip, "tokenize_line"):
        return clip
    for embedder in getattr(clip, "embedders", ()):
        if hasattr(embedder, "tokenize_line"):
            return embedder
    raise ValueError("token explanation and mitigation need the WebUI's CLIP tokenizer; this model has none")


class _OpenClipTokenNames:
    """OpenCLIP's BPE (SD2's text encoder) behind the one tokenizer call row_tokens makes."""

    def __init__(self, bpe):
        self.decoder = bpe.decoder
        self.pat = bpe.pat

    def convert_ids_to_tokens(self, ids):
        return [self.decoder[i] for i in ids]


def chunker_tokenizer(clip):
    """The chunker's tokenizer: CLIP's HF tokenizer (SD1, SDXL's CLIP-L); on SD2 the chunker wraps OpenCLIP,
    whose BPE the WebUI keeps as a module global, not on the model."""
    tokenizer = getattr(clip.wrapped, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer
    from modules import sd_hijack_open_clip
    return _OpenClipTokenNames(sd_hijack_open_clip.tokenizer)


def embedding_words(chunks, raw: List[str]):
    """(token text, whether it ends a word) per position of `chunks`' tokens (`raw`: their BPE strings): a
    textual-inversion embedding's vectors (the chunker's `fixes`: offset after the chunk's BOS, embedding) are one
    word, shown by the embedding's name."""
    names, ends = [s.replace("</w>", "") for s in raw], [s.endswith("</w>") for s in raw]
    base = 0
    for chunk in chunks:
        for offset, embedding in getattr(chunk, "fixes", None) or ():
            span = range(base + offset + 1, min(base + offset + 1 + int(embedding.vectors), len(raw)))
            for i in span:
                names[i], ends[i] = ("" if i > span.start else embedding.name), i == span[-1]
        base += len(chunk.tokens)
    return names, ends


def row_tokens(p, layout, iteration: int, length: int, clip, tokenizer):
    """Token strings, prompt masks, word numbers (memoguard.model.word_numbers: a word's BPE pieces share one) and
    the text at the first step (prompt editing applied) of every cond row, padded to `length` positions.

    clip: the WebUI's prompt chunker (tokenize_line, id_start/id_end/id_pad); tokenizer: its CLIP tokenizer.
    """
    from modules import prompt_parser
    prompts = list(p.prompts) if getattr(p, "prompts", None) else [p.prompt] * len(layout)
    sub_indexes, flat, _ = prompt_parser.get_multicond_prompt_list(prompts)
    specials = {clip.id_start, clip.id_end, clip.id_pad}
    tokens, masks, words, texts = [], [], [], []
    for indexes in sub_indexes:
        for flat_index, _ in indexes:
            text = prompt_parser.get_learned_conditioning_prompt_schedules([flat[flat_index]], max(1, p.steps))[0][0][1]
            chunks, _ = clip.tokenize_line(text)
            ids = [t for chunk in chunks for t in chunk.tokens][:length]
            names, ends = embedding_words(chunks, tokenizer.convert_ids_to_tokens(ids))
            pad = length - len(ids)
            in_prompt = [t not in specials for t in ids] + [False] * pad
            tokens.append(names + [""] * pad)
            masks.append(in_prompt)
            words.append(word_numbers(ends + [True] * pad, in_prompt))
            texts.append(text)
    return tokens, torch.tensor(masks, dtype=torch.bool), words, texts
