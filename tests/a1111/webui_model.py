"""The bundled tiny model behind an A1111-shaped LatentDiffusion: apply_model, alphas_cumprod, conditioning;
an SDXL-shaped variant (TinyXLDiffusion)."""
from types import SimpleNamespace

import torch

from modules.prompt_parser import DictWithShape
from modules.sd_hijack import ChunkingTokenizer, model_hijack
from tests.comfyui.harness import timestep_embedding, tiny_sdxl_unet


class TinyLatentDiffusion:
    parameterization = "eps"

    def __init__(self, diffusers_model):
        self.diffusers_model = diffusers_model
        self.unet = diffusers_model.unet
        self.text_encoder = diffusers_model.text_encoders[0]
        self.alphas_cumprod = diffusers_model.alphas_cumprod
        self.model = SimpleNamespace(conditioning_key="crossattn", diffusion_model=self.unet)
        self.sd_checkpoint_info = SimpleNamespace(model_name="tiny-sd")
        self.latent_shape = diffusers_model.latent_shape()
        self.image_size = diffusers_model.image_size()  # (height, width)

    def parameters(self):
        yield from self.unet.parameters()
        yield from self.text_encoder.parameters()

    def apply_model(self, x_noisy, t, cond):
        return self.unet(x_noisy, t, encoder_hidden_states=cond["c_crossattn"][0]).sample

    def get_learned_conditioning(self, prompts):
        """(B, 77 * chunks, C) for the batch, each 77-token chunk encoded on its own, weighted by emphasis."""
        return model_hijack.clip.encode(self.text_encoder, prompts)[0]


class TinyXLDiffusion(TinyLatentDiffusion):
    """SDXL's shape on the tiny model: dict conditioning, a UNet taking "vector" as its ADM input y (random weights).

    As A1111 hijacks SDXL, model_hijack.clip is sgm's GeneralConditioner: text embedders in `embedders`
    (the CLIP-L one chunks prompts and holds the HF tokenizer), an empty nn.Module as `wrapped`, no tokenize_line.
    """

    def __init__(self, diffusers_model):
        super().__init__(diffusers_model)
        self.unet = tiny_sdxl_unet(pooled_channels=self.text_encoder.config.hidden_size)
        self.model.diffusion_model = self.unet
        self.sd_checkpoint_info = SimpleNamespace(model_name="tiny-sdxl")
        self.conditioner = SimpleNamespace(embedders=[ChunkingTokenizer(diffusers_model.tokenizers[0])],
                                           wrapped=torch.nn.Module())
        height, width = diffusers_model.image_size()
        # original size, crop top-left, target size: 256 sinusoidal features each, as sgm's ConcatTimestepEmbedderND
        self.size_features = timestep_embedding(torch.tensor([height, width, 0, 0, height, width]), 256).flatten()

    def apply_model(self, x_noisy, t, cond):
        # sgm's OpenAIWrapper: context = cond["crossattn"], y = cond["vector"]; c_concat is unused (not inpainting)
        return self.unet(x_noisy, t, encoder_hidden_states=cond["crossattn"], class_labels=cond["vector"]).sample

    def get_learned_conditioning(self, prompts):
        """DictWithShape for the batch: crossattn padded with empty chunks to the longest prompt,
        vector = pooled output of the first chunk ++ size features for the batch's size (default 1024 x 1024)."""
        crossattn, pooled = self.conditioner.embedders[0].encode(self.text_encoder, prompts)
        height, width = getattr(prompts, "height", None) or 1024, getattr(prompts, "width", None) or 1024
        size = timestep_embedding(torch.tensor([height, width, 0, 0, height, width]), 256).flatten()
        vector = torch.cat([pooled, size.expand(len(prompts), -1)], dim=1)
        return DictWithShape({"crossattn": crossattn, "vector": vector})
