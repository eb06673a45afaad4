"""memoguard.DiffusionModel over a loaded ComfyUI model, so the core's explanation and mitigation run on it.

ComfyUI's timestep is sigma and its models return the denoised image at x = x0 + sigma*eps:
parameterization "x0", alpha = 1. ComfyUI executes nodes under torch.inference_mode(); gradients
need `differentiable(...)` first (memoguard.host_autograd, shared with the Forge adapter).

Supported: cross-attention UNets whose conditioning is CLIP's 77-slot chunks (SD1.x, SD2.x,
SDXL). SDXL's `y` (pooled text + size ids) is built by the model's own `extra_conds`, as the
sampler builds it, and rides along unoptimised. Rectified-flow models (SD3, Flux) are refused:
their T5 positions do not line up with CLIP tokens and BOS slots.
"""
import math
from typing import List, Optional

import torch

from memoguard import DiffusionModel, PromptEncoding
from memoguard.errors import MemoGuardError
from memoguard.host_autograd import ordinary
from memoguard.hosts import CHUNK, coefficients_kdiffusion

from .calibration_choice import prediction_of
from .monitor_hook import is_rectified_flow

SUPPORTED = "SD1.x, SD2.x and SDXL"
CROSSATTN = "c_crossattn"  # the model_conds entry holding the text-encoder output


class UnsupportedModel(MemoGuardError, ValueError):
    """A model family whose conditioning MemoGuard's gradient features cannot map to prompt tokens."""


def interrupted() -> bool:
    """ComfyUI's interrupt flag (the queue's Cancel): MemoGuard's loops stop with the sampler."""
    from comfy import model_management
    return model_management.processing_interrupted()


def check_supported(base_model) -> None:
    if is_rectified_flow(base_model):
        raise UnsupportedModel(f"{type(base_model).__name__} is a rectified-flow model (SD3, Flux): token "
                               f"contributions and embedding minimization support {SUPPORTED} only")


def split_model_conds(model_conds: dict):
    """(text-encoder output, the other model inputs such as SDXL's y) from a conditioning's model_conds."""
    if CROSSATTN not in model_conds:
        raise UnsupportedModel(f"this model's conditioning has no {CROSSATTN} (has {sorted(model_conds)}): "
                               f"supported are {SUPPORTED}")
    extra = {k: ordinary(v.cond) for k, v in model_conds.items() if k != CROSSATTN}
    return ordinary(model_conds[CROSSATTN].cond), extra


class ComfyDiffusionModel(DiffusionModel):
    """A ComfyUI BaseModel (ModelPatcher.model) with a sampling schedule and, for encode(), a CLIP.

    noise: the sampler-shaped noise; encode() derives SDXL's size conditioning from it exactly as
    the sampler does (comfy.samplers.encode_model_conds: width/height = latent size x 8).
    """

    parameterization = "x0"

    def __init__(self, base_model, sigmas: Optional[torch.Tensor] = None, clip=None,
                 noise: Optional[torch.Tensor] = None, device=None):
        check_supported(base_model)
        self.base = base_model
        self.sigmas = sigmas
        self.clip = clip
        self.noise = noise
        self.device = device  # where encode() puts the conditioning (CLIP outputs land on the CPU)
        self.prediction = prediction_of(base_model)  # what the checkpoint predicts, for calibrations

    def raw_prediction(self, x, t, embedding, extra):
        return self.base.apply_model(x, t, c_crossattn=embedding, **extra)

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
        length = max(r[0].shape[1] for r in rows)
        if any(r[0].shape[1] != length for r in rows):
            raise ValueError("prompts of different lengths (in 77-token chunks) cannot be batched")
        return self._batch(rows)

    def encode_by_length(self, prompts):
        """ComfyUI encodes one prompt at a time: the groups come from each prompt's own length."""
        rows = [self._encode_one(p, "positive") for p in prompts]
        lengths = [r[0].shape[1] for r in rows]
        return [([i for i, n in enumerate(lengths) if n == length],
                 self._batch([r for r, n in zip(rows, lengths) if n == length])) for length in sorted(set(lengths))]

    def _batch(self, rows) -> PromptEncoding:
        extra = {k: torch.cat([r[4][k] for r in rows]) for k in rows[0][4]}
        embedding = torch.cat([r[0] for r in rows])
        if self.device is not None:
            embedding, extra = embedding.to(self.device), {k: v.to(self.device) for k, v in extra.items()}
        return PromptEncoding(embedding, [r[1] for r in rows],
                              torch.stack([r[2] for r in rows]), torch.stack([r[3] for r in rows]), extra)

    def _encode_one(self, text: str, prompt_type: str):
        with_ids = self.clip.tokenize(text, return_word_ids=True)
        key = next(iter(with_ids))  # "l" for SD1; SDXL's "g" has the same positions
        pairs = [p for chunk in with_ids[key] for p in chunk]
        names = [name for _, name in self.clip.tokenizer.untokenize([(tok, w) for tok, w, _ in pairs])]
        cond, options = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))[0]
        embedding, extra = split_model_conds(self._model_conds(cond, options, prompt_type))
        if embedding.shape[1] != len(pairs):
            raise UnsupportedModel(f"the conditioning has {embedding.shape[1]} positions but the tokenizer "
                                   f"{len(pairs)}: supported are {SUPPORTED}")
        word_ids = torch.tensor([wid for _, _, wid in pairs])
        slots = torch.arange(len(pairs)) % CHUNK
        return (embedding, [n.replace("</w>", "") for n in names], word_ids > 0, slots == 0, extra)

    def _model_conds(self, cond, options: dict, prompt_type: str) -> dict:
        """The model inputs the sampler would build from this CONDITIONING entry (encode_model_conds)."""
        if self.noise is None:
            raise ValueError("encode() needs the sampler-shaped noise (ComfyDiffusionModel(..., noise=...))")
        noise = self.noise
        params = {**options, "cross_attn": cond, "device": noise.device, "noise": noise,
                  "width": options.get("width", noise.shape[3] * 8), "height": options.get("height", noise.shape[2] * 8),
                  "prompt_type": options.get("prompt_type", prompt_type)}
        return self.base.extra_conds(**params)
