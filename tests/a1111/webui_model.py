"""The bundled tiny model behind an A1111-shaped LatentDiffusion: apply_model, alphas_cumprod, conditioning."""
from types import SimpleNamespace

import torch

from modules.sd_hijack import model_hijack


class TinyLatentDiffusion:
    parameterization = "eps"

    def __init__(self, diffusers_model):
        self.diffusers_model = diffusers_model
        self.unet = diffusers_model.unet
        self.text_encoder = diffusers_model.text_encoders[0]
        self.alphas_cumprod = diffusers_model.alphas_cumprod
        self.model = SimpleNamespace(conditioning_key="crossattn")
        self.sd_checkpoint_info = SimpleNamespace(model_name="tiny-sd")
        self.latent_shape = diffusers_model.latent_shape()

    def parameters(self):
        yield from self.unet.parameters()
        yield from self.text_encoder.parameters()

    def apply_model(self, x_noisy, t, cond):
        return self.unet(x_noisy, t, encoder_hidden_states=cond["c_crossattn"][0]).sample

    def get_learned_conditioning(self, prompts):
        """One (77 * chunks, C) tensor per prompt, each 77-token chunk encoded on its own."""
        conds = []
        for prompt in prompts:
            ids = torch.tensor([chunk.tokens for chunk in model_hijack.clip.tokenize_line(prompt)[0]])
            conds.append(self.text_encoder(ids).last_hidden_state.reshape(-1, self.text_encoder.config.hidden_size))
        return conds
