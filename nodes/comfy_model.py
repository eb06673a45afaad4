"""memoguard.DiffusionModel over a loaded ComfyUI model, so the core's explanation and mitigation run on it.

ComfyUI's timestep is sigma and its models return the denoised image at x = x0 + sigma*eps
(rectified flow: x = sigma*eps + (1 - sigma)*x0): parameterization "x0", alpha = 1 (or 1 - sigma).
ComfyUI executes nodes under torch.inference_mode(); gradients need `differentiable(...)` first.
"""
from contextlib import contextmanager
from typing import List, Optional

import torch

from memoguard import DiffusionModel, PromptEncoding

from .monitor_hook import is_rectified_flow

CHUNK = 77  # ComfyUI pads every prompt chunk to 77 positions, BOS first


def _make_parameters_differentiable(module: torch.nn.Module) -> None:
    """Inference-mode weights cannot be saved for backward: swap them for ordinary copies (same values)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_inference():
                sub._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_inference():
                sub._buffers[name] = b.clone()


@contextmanager
def differentiable(base_model: torch.nn.Module):
    """Leave ComfyUI's inference mode so autograd can run through `base_model`."""
    with torch.inference_mode(False):
        _make_parameters_differentiable(base_model)
        yield


def ordinary(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A copy that autograd accepts (call inside `differentiable`)."""
    return None if t is None else t.detach().clone()


class ComfyDiffusionModel(DiffusionModel):
    """A ComfyUI BaseModel (ModelPatcher.model) with a sampling schedule and, for encode(), a CLIP."""

    parameterization = "x0"

    def __init__(self, base_model, sigmas: Optional[torch.Tensor] = None, clip=None):
        self.base = base_model
        self.flow = is_rectified_flow(base_model)
        self.sigmas = sigmas
        self.clip = clip

    def raw_prediction(self, x, t, embedding, extra):
        return self.base.apply_model(x, t, c_crossattn=embedding, **extra)

    def coefficients(self, t):
        t = torch.as_tensor(t, dtype=torch.float32)
        return (1 - t if self.flow else torch.ones_like(t)), t

    def timesteps(self, steps: int) -> torch.Tensor:
        if self.sigmas is None or len(self.sigmas) - 1 != steps:
            raise ValueError(f"this model was set up with a {0 if self.sigmas is None else len(self.sigmas) - 1}"
                             f"-step schedule, not {steps}")
        return self.sigmas[:-1]

    def initial_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """x at the first sigma, scaled exactly as ComfyUI's samplers scale a full-denoise start."""
        sigma = self.sigmas[:1].to(noise.device)
        return self.base.model_sampling.noise_scaling(sigma, noise, torch.zeros_like(noise), max_denoise=True)

    def encode(self, prompts: List[str]) -> PromptEncoding:
        rows = [self._encode_one(p) for p in prompts]
        length = max(r[0].shape[1] for r in rows)
        if any(r[0].shape[1] != length for r in rows):
            raise ValueError("prompts of different lengths (in 77-token chunks) cannot be batched")
        return PromptEncoding(torch.cat([r[0] for r in rows]), [r[1] for r in rows],
                              torch.stack([r[2] for r in rows]), torch.stack([r[3] for r in rows]))

    def _encode_one(self, text: str):
        with_ids = self.clip.tokenize(text, return_word_ids=True)
        key = next(iter(with_ids))  # "l" for SD1; SDXL's "g" has the same positions
        pairs = [p for chunk in with_ids[key] for p in chunk]
        names = [name for _, name in self.clip.tokenizer.untokenize([(tok, w) for tok, w, _ in pairs])]
        cond = self.clip.encode_from_tokens(self.clip.tokenize(text))
        word_ids = torch.tensor([wid for _, _, wid in pairs])
        slots = torch.arange(len(pairs)) % CHUNK
        return (cond, [n.replace("</w>", "") for n in names], word_ids > 0, slots == 0)
