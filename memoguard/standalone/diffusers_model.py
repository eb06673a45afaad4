"""The standalone path: any local diffusers SD1.x / SD2.x / SDXL pipeline folder, or a single-file
checkpoint of those families (memoguard.standalone.checkpoints), as a DiffusionModel.

Components are loaded with the standard diffusers/transformers `from_pretrained` from local
files only. The bundled tiny model is such a folder without a VAE (it works in pixel space).
Prompts longer than one 77-token window are split into 75-token chunks, each wrapped in
BOS/EOS and encoded separately, then concatenated, as A1111 and ComfyUI do.
"""
import json
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from ..errors import ModelLoadError
from ..identity import weights_fingerprint
from ..model import CHUNK, TOKENS_PER_CHUNK, DiffusionModel, PromptEncoding, word_numbers
from ..score import coefficients_vp
from ..resources import asset_path

BUNDLED_MODEL = asset_path("tiny-sd")
PREDICTIONS = ("auto", "eps", "v")  # load_model(prediction=...), the CLI's --prediction


class DiffusersModel(DiffusionModel):
    reencodes = True

    def __init__(self, unet, text_encoders, tokenizers, scheduler, vae=None, name="model",
                 device="cpu", dtype=torch.float32):
        self.unet, self.text_encoders, self.tokenizers = unet, text_encoders, tokenizers
        self.scheduler, self.vae, self.name = scheduler, vae, name
        self.training_notes = {}  # an evaluation model's memoguard_training.json (its guidance, its dataset)
        self.device, self.dtype = torch.device(device), dtype
        prediction = scheduler.config.get("prediction_type", "epsilon")
        kinds = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
        if prediction not in kinds:
            raise ModelLoadError(f"unknown prediction_type {prediction!r} in the scheduler config")
        self.parameterization = kinds[prediction]
        self.init_noise_sigma = float(getattr(scheduler, "init_noise_sigma", 1.0))
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.is_sdxl = len(text_encoders) == 2
        self.lora: Optional[str] = None  # the LoRA file attached (memoguard.standalone.lora)
        self._key = None
        self._token_texts = {}

    @classmethod
    def from_pipeline(cls, pipe, name: str = "pipeline") -> "DiffusersModel":
        """The parts of a loaded diffusers SD1.x / SD2.x / SDXL pipeline (shared, not copied)."""
        encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
        tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
        return cls(pipe.unet, encoders, tokenizers, pipe.scheduler, vae=getattr(pipe, "vae", None), name=name,
                   device=pipe.unet.device, dtype=pipe.unet.dtype)

    @property
    def model_key(self) -> str:
        """The weights fingerprint calibrations are stored under (memoguard.identity), the same in every host."""
        if self._key is None:
            self._key = weights_fingerprint(self.unet)
        return self._key

    def weights_changed(self) -> None:
        """The weights were changed in place (a LoRA attached, turned on or off): the key is taken again."""
        self._key = None

    # -- DiffusionModel -------------------------------------------------------------------
    def raw_prediction(self, x, t, embedding, extra):
        kwargs = {}
        if self.is_sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": extra["text_embeds"], "time_ids": extra["time_ids"]}
        return self.unet(x.to(self.dtype), t, encoder_hidden_states=embedding.to(self.dtype), **kwargs).sample

    def coefficients(self, t):
        return coefficients_vp(self.alphas_cumprod, t)

    def timesteps(self, steps: int) -> torch.Tensor:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.scheduler.set_timesteps(steps)
        return self.scheduler.timesteps.to(self.device)

    @torch.no_grad()
    def encode(self, prompts: List[str]) -> PromptEncoding:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("encode() takes a list of prompt strings")
        tok = self.tokenizers[0]
        return self._encode_ids(tok(list(prompts), add_special_tokens=False, truncation=False).input_ids)

    @torch.no_grad()
    def encode_without(self, cond: PromptEncoding, edits) -> PromptEncoding:
        if cond.ids is None:
            raise ValueError("this encoding carries no token ids (it was not made by encode())")
        pieces = []
        for row, drop in edits:
            keep = cond.prompt_mask[row].clone()
            keep[list(drop)] = False
            pieces.append(cond.ids[row][keep.to(cond.ids.device)].tolist())
        return self._encode_ids(pieces, chunks=cond.embedding.shape[1] // CHUNK, repeat_shorter=True)

    def _encode_ids(self, pieces: List[List[int]], chunks: int = 1, repeat_shorter: bool = False) -> PromptEncoding:
        """Prompts given as token ids without BOS/EOS, in 75-token chunks, at least `chunks` of them: a prompt with
        fewer chunks gets empty ones, or with repeat_shorter its own chunks repeated where their number divides
        the length (memoguard.model.fit_shorter_prompt: the prompt as if typed alone; else marked padded)."""
        tok = self.tokenizers[0]
        own = [max(1, -(-len(ids) // TOKENS_PER_CHUNK)) for ids in pieces]
        n_chunks = max(chunks, *own)
        repeats = [n_chunks // n if repeat_shorter and n_chunks % n == 0 else 1 for n in own]
        rows, lengths = [], []  # token ids; prompt tokens per chunk
        for ids, n, times in zip(pieces, own, repeats):
            mine = ([ids[c * TOKENS_PER_CHUNK:(c + 1) * TOKENS_PER_CHUNK] for c in range(n)] * times)
            mine += [[]] * (n_chunks - len(mine))
            rows.append([i for chunk in mine for i in [tok.bos_token_id, *chunk, tok.eos_token_id]
                         + [tok.pad_token_id] * (TOKENS_PER_CHUNK - len(chunk))])
            lengths.append([len(chunk) for chunk in mine])
        # where each chunk's BOS, words, EOS and padding lie, from the chunks' lengths alone
        position = torch.arange(n_chunks * CHUNK)
        in_chunk = position % CHUNK
        words = torch.tensor(lengths)[:, position // CHUNK]
        # a repeat is the prompt attended again, not words of its own: frozen, outside the prompt mask
        repeat = (position >= torch.tensor(own)[:, None] * CHUNK) & (words > 0)
        masks = (in_chunk >= 1) & (in_chunk <= words) & ~repeat
        frozen = (in_chunk == 0) | repeat
        ids = torch.tensor(rows, device=self.device)
        if self.is_sdxl:  # the second tokenizer pads with its own id ("!" in SDXL)
            ids_2 = ids.masked_fill((in_chunk > words + 1).to(self.device), self.tokenizers[1].pad_token_id)
        hidden, pooled = [], None
        for c in range(n_chunks):
            window = ids[:, c * CHUNK:(c + 1) * CHUNK]
            if self.is_sdxl:
                outs = [te(w, output_hidden_states=True)
                        for te, w in zip(self.text_encoders, (window, ids_2[:, c * CHUNK:(c + 1) * CHUNK]))]
                hidden.append(torch.cat([o.hidden_states[-2] for o in outs], dim=-1))
                pooled = outs[1].text_embeds if pooled is None else pooled
            else:
                hidden.append(self.text_encoders[0](window).last_hidden_state)
        extra = {}
        if self.is_sdxl:
            h, w = self.image_size()
            extra = {"text_embeds": pooled.to(self.dtype),
                     "time_ids": torch.tensor([[h, w, 0, 0, h, w]] * len(pieces), device=self.device, dtype=self.dtype)}
        texts = [self._texts(row) for row in rows]
        padded = [repeat_shorter and n < n_chunks and times == 1 for n, times in zip(own, repeats)]
        return PromptEncoding(torch.cat(hidden, dim=1).to(self.dtype), [[t for t, _ in row] for row in texts], masks,
                              frozen, extra, ids, [word_numbers([e for _, e in row], mask) for row, mask in
                                                     zip(texts, masks.tolist())], padded=padded if any(padded) else None)

    def _texts(self, ids: List[int]) -> List[Tuple[str, bool]]:
        """Each id's token as shown to users, and whether it ends a word (CLIP's "</w>"); memoised (an audit
        meets the same few thousand ids again)."""
        missing = [i for i in set(ids) if i not in self._token_texts]
        for i, token in zip(missing, self.tokenizers[0].convert_ids_to_tokens(missing)):
            self._token_texts[i] = (token.replace("</w>", ""), token.endswith("</w>"))
        return [self._token_texts[i] for i in ids]

    # -- images ---------------------------------------------------------------------------
    def full_range_timesteps(self, steps: int) -> torch.Tensor:
        """`steps` integer timesteps from the noisiest (T - 1) to the cleanest (1), noisiest first: a band over them
        covers where k-diffusion samplers start (sigma max) and where DDIM ends."""
        last = len(self.alphas_cumprod) - 1
        return torch.linspace(last, 1, max(2, steps), device=self.device).round().long()

    def latent_shape(self):
        s = self.unet.config.sample_size
        return (self.unet.config.in_channels, s, s)

    def image_size(self):
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        return self.unet.config.sample_size * scale, self.unet.config.sample_size * scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (B, H, W, 3) float in [0, 1] on the CPU."""
        if self.vae is not None:
            latents = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((latents.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()


def load_model(path: Optional[Path] = None, device: str = "cpu", dtype=torch.float32, prediction: str = "auto",
               config: Optional[Path] = None) -> DiffusionModel:
    """Load a local diffusers pipeline folder (the bundled tiny model by default) or a single-file SD1.x /
    SD2.x / SDXL checkpoint (.safetensors / .ckpt in the original LDM layout, offline: memoguard.standalone.checkpoints).
    An SD3 / SD3.5 or Flux.1 pipeline folder loads as a flow model (memoguard.standalone.diffusers_flow).

    prediction: "auto" (a folder: its scheduler config; a file: see memoguard.standalone.checkpoints), "eps" or "v".
    config: for a single file of a non-standard architecture, a diffusers-layout folder with its configs.
    """
    try:
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    except ImportError as e:
        raise ModelLoadError("the standalone path needs diffusers and transformers: "
                             "pip install -e '.[standalone]'") from e
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    diffusers_logging.set_verbosity_error()  # "accelerate not installed" etc. would bury our output
    transformers_logging.set_verbosity_error()
    folder = Path(path or BUNDLED_MODEL)
    if prediction not in PREDICTIONS:
        raise ModelLoadError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
    if folder.is_file():
        from .checkpoints import checkpoint_parts
        parts = checkpoint_parts(folder, dtype, prediction=prediction, config=config)
        model = build_model(*parts.components, name=folder.stem, device=device, dtype=dtype,
                            notes_dir=parts.notes_dir)
        model.family, model.prediction_source = parts.family, parts.prediction_source
        return model
    if not folder.exists():
        raise ModelLoadError(f"{folder} does not exist (no model_index.json folder, no .safetensors/.ckpt file)")
    if config is not None:
        raise ModelLoadError(f"config= is for single-file checkpoints; {folder} is a folder")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{index_file} is unreadable: {e}") from None
    from .diffusers_flow import PIPELINES, load_flow_pipeline
    if index.get("_class_name") in PIPELINES:
        if prediction != "auto":
            raise ModelLoadError(f"{index['_class_name']} is a flow-matching model: --prediction does not apply")
        return load_flow_pipeline(folder, index, device, dtype)
    sdxl = isinstance(index.get("text_encoder_2"), list) and index["text_encoder_2"][0] is not None
    try:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
        scheduler = DDIMScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
        tokenizers = [CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)]
        encoders = [CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)]
        if sdxl:
            tokenizers.append(CLIPTokenizer.from_pretrained(folder / "tokenizer_2", local_files_only=True))
            encoders.append(CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", local_files_only=True))
        has_vae = isinstance(index.get("vae"), list) and index["vae"][0] is not None
        vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True) if has_vae else None
    except Exception as e:  # diffusers/transformers raise many types for missing or corrupt files
        raise ModelLoadError(f"could not load the model in {folder}: {type(e).__name__}: {e}") from None
    if prediction != "auto":
        scheduler = DDIMScheduler.from_config(scheduler.config,
                                              prediction_type="v_prediction" if prediction == "v" else "epsilon")
    return build_model(unet, encoders, tokenizers, scheduler, vae, folder.name, device, dtype, notes_dir=folder)


def build_model(unet, encoders, tokenizers, scheduler, vae, name, device="cpu", dtype=torch.float32,
                notes_dir: Optional[Path] = None) -> DiffusersModel:
    """Loaded components -> DiffusersModel, frozen on `device` in `dtype` (shared by folders and single files)."""
    for m in [unet, *encoders] + ([vae] if vae is not None else []):
        m.to(device).eval().requires_grad_(False)
        if dtype != torch.float32:
            m.to(dtype)
    model = DiffusersModel(unet, encoders, tokenizers, scheduler, vae, name=name, device=device, dtype=dtype)
    if notes_dir is not None:
        read_training_notes(model, notes_dir)
    return model


def read_training_notes(model, folder: Path) -> None:
    """An evaluation model's own memoguard_training.json, where its folder has one: its guidance and its dataset."""
    notes = folder / "memoguard_training.json"
    if notes.is_file():
        model.training_notes = json.loads(notes.read_text())
        model.guidance = float(model.training_notes.get("guidance", model.guidance))

