"""Qwen-Image (diffusers' QwenImagePipeline) as a DiffusionModel: a flow-matching DiT conditioned on the last hidden
states of a Qwen2.5-VL language model.

Encoded as the pipeline encodes: the prompt inside the pipeline's chat template (`prompt_template_encode`), the
template's first `prompt_template_encode_start_idx` tokens dropped, each prompt at its own length under a mask (a
batch is zero-padded to its longest prompt, as the pipeline pads it). A word is a run of letters and digits or of
punctuation in the prompt's text; a token belongs to the word its last character falls in (byte-level BPE pieces
carry their leading space), and leaving a word out is the prompt typed without it, encoded again. CFG is the
pipeline's: the guided velocity rescaled, each 2x2 latent patch, to the norm of the prompt's own velocity. The
latents are packed 2x2 as Flux's, and the VAE is the pipeline's video VAE (one frame) with its latent mean and std.
"""
import re
from typing import List

import torch

from ..errors import MemoGuardError, ModelLoadError
from ..model import PromptEncoding
from .diffusers_flow import DiffusersFlowModel, pack_latents, unpack_latents

WORD = re.compile(r"\w+|[^\w\s]+")


def typed_without(text: str, words) -> str:
    """`text` without its words numbered in `words` (WORD's runs), each with the white space before it, the rest as
    typed: "a red cat, on a mat" without "red" is "a cat, on a mat"; the first word kept takes the text's lead."""
    matches = list(WORD.finditer(text))
    if not matches:
        return text
    before = [text[(m0.end() if m0 else 0):m.start()] for m0, m in zip([None] + matches[:-1], matches)]
    kept = [(before[k], m.group()) for k, m in enumerate(matches) if k not in words]
    out = "".join((before[0] if i == 0 else space) + word for i, (space, word) in enumerate(kept))
    return out + text[matches[-1].end():]


class QwenImageModel(DiffusersFlowModel):
    repeats_shorter_prompt = False  # a prompt's length is its own; the pipeline masks, never repeats
    guidance = 4.0  # the pipeline's true_cfg_scale

    def __init__(self, pipe, name: str = "pipeline"):
        if not getattr(pipe.tokenizer, "is_fast", False):  # words are found by the tokens' character offsets
            raise ModelLoadError(f"{name}: Qwen-Image's words need a fast tokenizer (character offsets); "
                                 f"{type(pipe.tokenizer).__name__} is not one (transformers >= 5 loads Qwen2Tokenizer "
                                 f"as one)")
        self.family, self.name = "qwen-image", name
        self.transformer, self.scheduler, self.vae = pipe.transformer, pipe.scheduler, pipe.vae
        self.tokenizer, self.text_encoder = pipe.tokenizer, pipe.text_encoder
        self.template, self.drop = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
        self.max_length = pipe.tokenizer_max_length
        self.device, self.dtype = self.transformer.device, self.transformer.dtype
        self.clips, self.t5, self.embedded_guidance = [], None, None
        self.sample_size = pipe.default_sample_size
        self.vae_scale = pipe.vae_scale_factor
        self.training_notes = {}
        self._key = None

    @property
    def tokenizers(self) -> list:
        return [self.tokenizer]

    # -- DiffusionModel -------------------------------------------------------------------
    def raw_prediction(self, x, t, embedding, extra):
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0]).to(self.dtype)
        b, c, h, w = x.shape
        out = self.transformer(hidden_states=pack_latents(x).to(self.dtype), timestep=t / 1000,
                               encoder_hidden_states=embedding.to(self.dtype),
                               encoder_hidden_states_mask=extra["mask"].to(x.device),
                               img_shapes=[[(1, h // 2, w // 2)]] * b).sample
        return unpack_latents(out, x.shape)

    def guided(self, eps_c, eps_u, scale):
        """The pipeline's CFG: u + s (c - u), rescaled in each 2x2 patch (a token of the DiT) to the norm of c."""
        combined = eps_u + scale * (eps_c - eps_u)
        b, c, h, w = combined.shape
        patch_norm = lambda v: v.reshape(b, c, h // 2, 2, w // 2, 2).pow(2).sum(dim=(1, 3, 5), keepdim=True).sqrt()
        ratio = patch_norm(eps_c) / patch_norm(combined)
        shaped = combined.reshape(b, c, h // 2, 2, w // 2, 2) * ratio
        return shaped.reshape(b, c, h, w)

    # -- prompts --------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: List[str]) -> PromptEncoding:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("encode() takes a list of prompt strings")
        prompts = list(prompts)
        start = len(self.template.split("{}")[0])
        tokens = self.tokenizer([self.template.format(p) for p in prompts], max_length=self.max_length + self.drop,
                                padding=True, truncation=True, return_tensors="pt", return_offsets_mapping=True)
        mask = tokens.attention_mask.bool()
        hidden = self.text_encoder(input_ids=tokens.input_ids.to(self.text_encoder.device),
                                   attention_mask=tokens.attention_mask.to(self.text_encoder.device),
                                   output_hidden_states=True).hidden_states[-1]
        rows = [(hidden[b][mask[b].to(hidden.device)][self.drop:], tokens.input_ids[b][mask[b]][self.drop:],
                 tokens.offset_mapping[b][mask[b]][self.drop:]) for b in range(len(prompts))]
        length = max(len(r[1]) for r in rows)
        embedding = torch.zeros(len(prompts), length, hidden.shape[-1], dtype=self.dtype, device=self.device)
        out_mask = torch.zeros(len(prompts), length, dtype=torch.long)
        names, prompt, frozen, ids, words = [], [], [], [], []
        for b, (states, row_ids, offsets) in enumerate(rows):
            n = len(row_ids)
            embedding[b, :n], out_mask[b, :n] = states.to(self.dtype), 1
            spans = [m.span() for m in WORD.finditer(prompts[b])]
            word_of = []
            for s, e in offsets.tolist():
                inside = start <= s and e <= start + len(prompts[b]) and e > s
                last = e - 1 - start
                word_of.append(next((k for k, (ws, we) in enumerate(spans) if ws <= last < we), -1) if inside else -1)
            word_of += [-1] * (length - n)
            pieces = [self.tokenizer.decode([int(i)]).strip() for i in row_ids.tolist()] + [""] * (length - n)
            names.append([p if w >= 0 else "" for p, w in zip(pieces, word_of)])
            prompt.append([w >= 0 for w in word_of])
            frozen.append([k < n and w < 0 for k, w in enumerate(word_of)])  # the template's tokens stay
            ids.append([int(i) if w >= 0 else -1 for i, w in zip(row_ids.tolist() + [0] * (length - n), word_of)])
            words.append(word_of)
        return PromptEncoding(embedding, names, torch.tensor(prompt), torch.tensor(frozen), {"mask": out_mask},
                              torch.tensor(ids, device=self.device), words, prompts)

    @torch.no_grad()
    def encode_without(self, cond: PromptEncoding, edits) -> PromptEncoding:
        """Each edit's prompt typed without the words at the left-out positions, encoded again; zero-padded (masked)
        to cond's length."""
        if cond.texts is None or cond.words is None:
            raise ValueError("this encoding carries no prompt text (it was not made by encode())")
        shorter = []
        for row, drop in edits:
            shorter.append(typed_without(cond.texts[row], {cond.words[row][i] for i in drop} - {-1}))
        enc = self.encode(shorter)
        length = cond.embedding.shape[1]
        if enc.embedding.shape[1] > length:
            raise MemoGuardError(f"a prompt without a word encodes to {enc.embedding.shape[1]} positions, more than "
                                 f"its own {length}")
        pad = length - enc.embedding.shape[1]
        sub = cond.rows([row for row, _ in edits])
        sub.extra = {"mask": torch.nn.functional.pad(enc.extra["mask"], (0, pad))}
        return sub.with_embedding(torch.nn.functional.pad(enc.embedding, (0, 0, 0, pad)).to(cond.embedding))

    # -- images ---------------------------------------------------------------------------
    def latent_shape(self):
        return self.transformer.config.in_channels // 4, self.sample_size, self.sample_size

    def image_size(self):
        return self.sample_size * self.vae_scale, self.sample_size * self.vae_scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (B, H, W, 3) float in [0, 1] on the CPU: one frame of the video VAE."""
        c = self.vae.config
        shape = (1, c.z_dim, 1, 1, 1)
        mean = torch.tensor(c.latents_mean).view(shape).to(latents.device, self.vae.dtype)
        std = torch.tensor(c.latents_std).view(shape).to(latents.device, self.vae.dtype)
        images = self.vae.decode(latents.to(self.vae.dtype).unsqueeze(2) * std + mean).sample[:, :, 0]
        return ((images.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()
