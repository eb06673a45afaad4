"""The bundled tiny model behind a Forge-shaped sd_model: forge_objects.unet (a UnetPatcher over a KModel) with
its weights loaded as inference tensors, as Forge loads them, and a text_processing_engine (no model_hijack.clip);
an SDXL variant (TinyForgeXLDiffusion)."""
import copy
from types import SimpleNamespace

import torch

from backend.diffusion_engine.base import ForgeObjects
from backend.modules.k_model import KModel
from backend.modules.k_prediction import Prediction
from backend.patcher.unet import UnetPatcher
from backend import memory_management
from backend.text_processing.classic_engine import ClassicTextProcessingEngine
from webui_model import TinyXLDiffusion


def loaded_under_inference_mode(module: torch.nn.Module) -> torch.nn.Module:
    with torch.inference_mode():
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None:
                    sub._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
    assert all(p.is_inference() for p in module.parameters())
    return module


class TinyForgeDiffusion:
    engine_name = "text_processing_engine"  # SDXL: text_processing_engine_l (and _g, which MemoGuard does not read)

    def __init__(self, diffusers_model, unet=None):
        self.alphas_cumprod = diffusers_model.alphas_cumprod
        self.latent_shape = diffusers_model.latent_shape()
        self.image_size = diffusers_model.image_size()  # (height, width)
        self.sd_checkpoint_info = SimpleNamespace(model_name="tiny-sd")
        self.text_encoder = diffusers_model.text_encoders[0]
        setattr(self, self.engine_name, ClassicTextProcessingEngine(diffusers_model.tokenizers[0]))
        unet = loaded_under_inference_mode(copy.deepcopy(diffusers_model.unet if unet is None else unet))
        kmodel = KModel(unet, Prediction(self.alphas_cumprod))
        self.forge_objects = ForgeObjects(UnetPatcher(kmodel), None, None, None)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()

    def get_learned_conditioning(self, prompts):
        """(B, 77 * chunks, C) for the batch under inference mode, as Forge's engines encode; the text encoder
        loaded first (memory_management)."""
        memory_management.load_model_gpu(self.text_encoder)
        with torch.inference_mode():
            return self.text_processing_engine.encode(self.text_encoder, prompts)[0]


class TinyForgeXLDiffusion(TinyForgeDiffusion):
    """Forge's SDXL engine on the tiny model: the A1111 SDXL stand-in's UNet (y = "vector") and conditioning,
    encoded under inference mode; prompts tokenized by text_processing_engine_l (CLIP-L), no text_processing_engine."""
    engine_name = "text_processing_engine_l"

    def __init__(self, diffusers_model):
        self.xl = TinyXLDiffusion(diffusers_model)
        super().__init__(diffusers_model, self.xl.unet)
        self.sd_checkpoint_info = self.xl.sd_checkpoint_info

    def get_learned_conditioning(self, prompts):
        """A plain {"crossattn", "vector"} dict for the batch, as Forge's StableDiffusionXL returns."""
        memory_management.load_model_gpu(self.text_encoder)
        with torch.inference_mode():
            return dict(self.xl.get_learned_conditioning(prompts))
