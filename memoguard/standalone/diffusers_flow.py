"""The standalone path for today's flow-matching diffusers pipelines: SD3 / SD3.5 (StableDiffusion3Pipeline), Flux.1
schnell / dev (FluxPipeline) and Chroma (ChromaPipeline), as a DiffusionModel.

The core reads a rectified flow as x = x0 + sigma * v (memoguard.score): the velocity is the prediction, the score the
velocity difference, its DDIM step the flow's Euler step, and the schedule's timestep is sigma * 1000 as diffusers'
FlowMatchEulerDiscreteScheduler gives it. Prompts are encoded the way these pipelines encode them:
- SD3: CLIP-L and CLIP-G (77 positions each, penultimate hidden states side by side, zero-padded to T5's width), then
  T5 (256 positions; zeros where the folder has no T5); pooled text is both CLIPs' projections.
- Flux: T5 (512 positions); CLIP-L only gives the pooled text. Flux dev also takes an embedded guidance value
  (`embedded_guidance`, the pipeline's `guidance_scale`, 3.5) and samples at CFG 1: a guidance-distilled model, scored
  with one unconditional pass at the first step only (memoguard.sampling).
- Chroma: Flux's architecture without CLIP or embedded guidance, sampled with real CFG (two passes a step, 5.0). T5
  (512 positions) runs under its tokenizer's attention mask, and the transformer sees the prompt's tokens, its
  end-of-text and the first padding position only (the pipeline's mask), so a shorter prompt is truly shorter there.
A word is the same in every tokenizer stream (the n-th word of each: CLIP BPE pieces end words, T5 sentencepiece
pieces start them, punctuation is a word in both), so leaving a word out removes it from every stream, the pooled CLIP
too: the prompt as if typed without it.
"""
from typing import Dict, List, NamedTuple, Optional

import torch

from ..errors import ModelLoadError
from ..identity import weights_fingerprint
from .diffusers_model import read_training_notes
from ..model import CHUNK, TOKENS_PER_CHUNK, WORD_START, DiffusionModel, PromptEncoding, sentencepiece_word_ends, \
    word_numbers

PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux", "ChromaPipeline": "chroma",
             "QwenImagePipeline": "qwen-image"}  # Qwen-Image: memoguard.standalone.diffusers_qwen
T5_LENGTH = {"sd3": 256, "flux": 512, "chroma": 512}  # the pipelines' default max_sequence_length
GUIDANCE = {"sd3": 7.0, "flux": 1.0, "chroma": 5.0}  # CFG scale the pipelines sample at (Flux is guidance-distilled)
PACKED = ("flux", "chroma", "qwen-image")  # 2x2 latent patches as tokens, Flux's layout
FLUX_EMBEDDED_GUIDANCE = 3.5  # FluxPipeline's guidance_scale, Flux dev's input
LATENT_SIZE = 128  # the pipelines' default sample size (1024 px)


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens, 2x2 patches as Flux's, Chroma's and Qwen-Image's
    pipelines pack them."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def unpack_latents(tokens: torch.Tensor, shape) -> torch.Tensor:
    """pack_latents undone: tokens -> latents of `shape` (B, C, H, W)."""
    b, c, h, w = shape
    return tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class _Tokens(NamedTuple):
    """One prompt in one tokenizer: ids without BOS/EOS and the word each id belongs to."""
    ids: List[int]
    words: List[int]


class DiffusersFlowModel(DiffusionModel):
    parameterization = "flow"
    reencodes = True
    # T5 pads with <pad>, not copies of an end token: padding masking only where a CLIP chunk comes first (SD3's
    # CLIP-L and CLIP-G positions, padded as SDXL's; T5's positions after them untouched)
    pads_with_end_token = False
    clip_positions = CHUNK

    def __init__(self, pipe, name: str = "pipeline"):
        family = PIPELINES.get(type(pipe).__name__)
        if family is None:
            raise ModelLoadError(f"{type(pipe).__name__} is not a flow pipeline MemoGuard serves "
                                 f"({', '.join(PIPELINES)})")
        self.family, self.name = family, name
        self.pads_with_end_token = family == "sd3"
        self.transformer, self.scheduler, self.vae = pipe.transformer, pipe.scheduler, pipe.vae
        self.device, self.dtype = self.transformer.device, self.transformer.dtype
        if family == "sd3":
            self.clips = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
            self.t5 = (pipe.tokenizer_3, pipe.text_encoder_3) if pipe.text_encoder_3 is not None else None
        elif family == "flux":
            self.clips = [(pipe.tokenizer, pipe.text_encoder)]
            self.t5 = (pipe.tokenizer_2, pipe.text_encoder_2)
        else:
            self.clips, self.t5 = [], (pipe.tokenizer, pipe.text_encoder)
        self.guidance = GUIDANCE[family]
        self.t5_length = T5_LENGTH.get(family)  # the max_sequence_length it samples at (an evaluation model's notes)
        guided = family == "flux" and self.transformer.config.guidance_embeds
        self.embedded_guidance: Optional[float] = FLUX_EMBEDDED_GUIDANCE if guided else None
        self.sample_size = getattr(self.transformer.config, "sample_size", None) or LATENT_SIZE
        self.training_notes = {}
        self._key = None

    @property
    def tokenizers(self) -> list:
        """The pipeline's tokenizers, CLIP's first where it has one (as DiffusersModel.tokenizers)."""
        return [tok for tok, _ in self.clips] + ([self.t5[0]] if self.t5 is not None else [])

    @property
    def model_key(self) -> str:
        """The fingerprint of the transformer's weights (memoguard.identity). ComfyUI holds these families' weights
        in their original layout (fused attention projections), which fingerprints differently: calibrate there."""
        if self._key is None:
            self._key = weights_fingerprint(self.transformer)
        return self._key

    # -- DiffusionModel -------------------------------------------------------------------
    def raw_prediction(self, x, t, embedding, extra):
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0]).to(self.dtype)
        embedding = embedding.to(self.dtype)
        if self.family == "sd3":
            return self.transformer(hidden_states=x.to(self.dtype), timestep=t, encoder_hidden_states=embedding,
                                    pooled_projections=extra["pooled"].to(self.dtype)).sample
        b, c, h, w = x.shape
        patches = pack_latents(x)
        rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(x.device, self.dtype)
        txt_ids = torch.zeros(embedding.shape[1], 3, device=x.device, dtype=self.dtype)
        if self.family == "chroma":  # the prompt's mask, then every image token
            mask = torch.cat([extra["attention_mask"].to(x.device, self.dtype).expand(b, -1),
                              torch.ones(b, patches.shape[1], device=x.device, dtype=self.dtype)], 1)
            out = self.transformer(hidden_states=patches.to(self.dtype), timestep=t / 1000,
                                   encoder_hidden_states=embedding, txt_ids=txt_ids, img_ids=img_ids,
                                   attention_mask=mask).sample
        else:
            guidance = (None if self.embedded_guidance is None
                        else torch.full((b,), self.embedded_guidance, device=x.device, dtype=torch.float32))
            out = self.transformer(hidden_states=patches.to(self.dtype), timestep=t / 1000, guidance=guidance,
                                   pooled_projections=extra["pooled"].to(self.dtype), encoder_hidden_states=embedding,
                                   txt_ids=txt_ids, img_ids=img_ids).sample
        return unpack_latents(out, x.shape)

    def coefficients(self, t):
        sigma = torch.as_tensor(t, dtype=torch.float32) / 1000
        return torch.ones_like(sigma), sigma

    def timesteps(self, steps: int) -> torch.Tensor:
        """The pipeline's own schedule: sigma * 1000, shifted as its scheduler shifts it (Flux, Chroma: sigmas
        from 1 to 1 / steps, shifted by the image's token count, the pipeline's `mu`, where the scheduler shifts
        dynamically)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if self.family in PACKED:
            sigmas = torch.linspace(1.0, 1 / steps, steps).tolist()
            dynamic = self.scheduler.config.get("use_dynamic_shifting")
            self.scheduler.set_timesteps(sigmas=sigmas, mu=self._shift_mu() if dynamic else None)
        else:
            self.scheduler.set_timesteps(steps)
        return self.scheduler.timesteps.to(self.device, torch.float32)

    def full_range_timesteps(self, steps: int) -> torch.Tensor:
        """A flow's own schedule already spans the whole noise range (sigma 1 to 1 / steps)."""
        return self.timesteps(max(2, steps))

    def _shift_mu(self) -> float:
        """The log-shift of a dynamic schedule at this image size: linear in the number of image tokens between the
        scheduler's (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
        c = self.scheduler.config
        tokens = (self.sample_size // 2) ** 2
        slope = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
        return c["base_shift"] + slope * (tokens - c["base_image_seq_len"])

    # -- prompts --------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: List[str]) -> PromptEncoding:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("encode() takes a list of prompt strings")
        return self._encode([self._tokenize(p) for p in prompts], list(prompts))

    @torch.no_grad()
    def encode_without(self, cond: PromptEncoding, edits) -> PromptEncoding:
        """Each row's prompt tokenized again, the words at the left-out positions dropped from every stream."""
        if cond.texts is None or cond.words is None:
            raise ValueError("this encoding carries no prompt text (it was not made by encode())")
        rows, texts = [], []
        for row, drop in edits:
            left_out = {cond.words[row][i] for i in drop} - {-1}
            rows.append({key: _Tokens([i for i, w in zip(s.ids, s.words) if w not in left_out],
                                      [w for w in s.words if w not in left_out])
                         for key, s in self._tokenize(cond.texts[row]).items()})
            texts.append(cond.texts[row])
        return self._encode(rows, texts)

    def _tokenize(self, text: str) -> Dict[str, _Tokens]:
        """{"clip": ..., "t5": ...}: the prompt in each tokenizer as the pipeline truncates it (Chroma: T5 alone).
        Words are numbered alike (the n-th word of one stream is the n-th of the other, CLIP's 75 tokens a prefix of
        T5's words); where the tokenizers split the prompt into different words, T5's are numbered after CLIP's (each
        explained and left out in its own stream)."""
        out, truncated = {}, False
        if self.clips:
            clip_tok = self.clips[0][0]
            ids = clip_tok(text, add_special_tokens=False, truncation=False).input_ids
            truncated, ids = len(ids) > TOKENS_PER_CHUNK, ids[:TOKENS_PER_CHUNK]
            names = clip_tok.convert_ids_to_tokens(ids)
            out["clip"] = _Tokens(ids, word_numbers([n.endswith("</w>") for n in names], [True] * len(ids)))
        if self.t5 is not None:
            t5_tok = self.t5[0]
            ids = t5_tok(text, add_special_tokens=False, truncation=False).input_ids[:self.t5_length - 1]
            words = word_numbers(sentencepiece_word_ends(t5_tok.convert_ids_to_tokens(ids), [1] * len(ids)),
                                 [True] * len(ids))
            clip_words = max(out["clip"].words, default=-1) + 1 if self.clips else 0
            if self.clips and not truncated and max(words, default=-1) + 1 != clip_words:
                words = [w + clip_words for w in words]
            out["t5"] = _Tokens(ids, words)
        return out

    def _encode(self, rows: List[Dict[str, _Tokens]], texts: List[str]) -> PromptEncoding:
        pooled, hidden = [], []
        for tok, encoder in self.clips:
            ids = torch.tensor([self._clip_row(r["clip"].ids, tok) for r in rows], device=self.device)
            out = encoder(ids, output_hidden_states=True)
            pooled.append(out[0] if self.family == "sd3" else out.pooler_output)
            hidden.append(out.hidden_states[-2])
        width = self.transformer.config.joint_attention_dim
        length = self.t5_length
        t5_hidden = torch.zeros(len(rows), length, width, device=self.device, dtype=self.dtype)
        if self.t5 is not None:
            tok, encoder = self.t5
            pad = lambda ids: ids + [tok.eos_token_id] + [tok.pad_token_id] * (length - 1 - len(ids))
            t5_ids = torch.tensor([pad(r["t5"].ids) for r in rows], device=self.device)
            # Chroma: T5 under its tokenizer's mask (the tokens and the end-of-text), the transformer under the
            # pipeline's (those and the first padding position)
            lengths = torch.tensor([len(r["t5"].ids) + 1 for r in rows], device=self.device).unsqueeze(1)
            positions = torch.arange(length, device=self.device).unsqueeze(0)
            mask = (positions < lengths).long() if self.family == "chroma" else None
            t5_hidden = encoder(t5_ids, attention_mask=mask)[0]
        if self.family == "sd3":  # CLIP-L and CLIP-G side by side, zero-padded to T5's width, then T5's positions
            clip_hidden = torch.cat(hidden, -1)
            clip_hidden = torch.nn.functional.pad(clip_hidden, (0, width - clip_hidden.shape[-1]))
            embedding = torch.cat([clip_hidden, t5_hidden.to(clip_hidden.dtype)], 1)
            streams = [("clip", CHUNK, 1), ("t5", length, 0)]
        else:
            embedding, streams = t5_hidden, [("t5", length, 0)]
        extra = ({"attention_mask": (positions <= lengths).to(self.dtype)} if self.family == "chroma"
                 else {"pooled": torch.cat(pooled, -1).to(self.dtype)})
        layouts = [self._layout(r, streams) for r in rows]
        tokens, prompt, frozen, ids, words = (list(part) for part in zip(*layouts))
        return PromptEncoding(embedding.to(self.dtype), tokens, torch.tensor(prompt), torch.tensor(frozen), extra,
                              torch.tensor(ids, device=self.device), words, texts)

    def _layout(self, row: Dict[str, _Tokens], streams):
        """One prompt's positions over `streams` [(key, positions, leading BOS)]: token texts (a word's text shown
        once, at its first stream), prompt and BOS masks, ids (-1 outside the prompt), word numbers."""
        tokens, prompt, frozen, ids, words, shown = [], [], [], [], [], set()
        for key, length, lead in streams:
            stream = row.get(key, _Tokens([], []))
            tok = self.clips[0][0] if key == "clip" else self.t5[0] if self.t5 is not None else None
            names = tok.convert_ids_to_tokens(stream.ids) if stream.ids else []
            for i in range(length):
                k = i - lead
                inside = 0 <= k < len(stream.ids)
                word = stream.words[k] if inside else -1
                own = inside and (word not in shown or key == streams[0][0])
                tokens.append(names[k].replace("</w>", "").replace(WORD_START, "") if own else "")
                prompt.append(inside)
                frozen.append(lead == 1 and i == 0)
                ids.append(stream.ids[k] if inside else -1)
                words.append(word)
            shown.update(stream.words)
        return tokens, prompt, frozen, ids, words

    @staticmethod
    def _clip_row(ids: List[int], tok) -> List[int]:
        return [tok.bos_token_id, *ids, tok.eos_token_id] + [tok.pad_token_id] * (TOKENS_PER_CHUNK - len(ids))

    # -- images ---------------------------------------------------------------------------
    def latent_shape(self):
        return (self.transformer.config.in_channels // (4 if self.family in PACKED else 1), self.sample_size,
                self.sample_size)

    def image_size(self):
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return self.sample_size * scale, self.sample_size * scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (B, H, W, 3) float in [0, 1] on the CPU."""
        c = self.vae.config
        images = self.vae.decode(latents.to(self.vae.dtype) / c.scaling_factor + (c.shift_factor or 0)).sample
        return ((images.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()


def load_flow_pipeline(folder, index: dict, device: str, dtype) -> DiffusersFlowModel:
    """A local SD3 / Flux / Chroma / Qwen-Image diffusers folder, offline, as a DiffusersFlowModel. Components its
    model_index.json lists as null stay absent (SD3 without T5, as the pipeline takes text_encoder_3=None)."""
    from diffusers import DiffusionPipeline
    absent = {name: None for name, spec in index.items() if isinstance(spec, list) and spec[0] is None}
    try:
        pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, dtype=dtype, **absent)
    except Exception as e:  # diffusers/transformers raise many types for missing or corrupt files
        raise ModelLoadError(f"could not load the pipeline in {folder}: {type(e).__name__}: {e}") from None
    pipe.to(device)
    for part in (pipe.transformer, pipe.vae, *[getattr(pipe, n, None) for n in
                                                ("text_encoder", "text_encoder_2", "text_encoder_3")]):
        if part is not None:
            part.eval().requires_grad_(False)
    if type(pipe).__name__ == "QwenImagePipeline":
        from .diffusers_qwen import QwenImageModel
        model = QwenImageModel(pipe, name=folder.name)
    else:
        model = DiffusersFlowModel(pipe, name=folder.name)
    read_training_notes(model, folder)
    if "max_sequence_length" in model.training_notes:  # what the flow evaluation model samples at
        model.t5_length = int(model.training_notes["max_sequence_length"])
    return model
