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
        vector = pooled output of the first chunk ++ size features."""
        clip = self.conditioner.embedders[0]
        chunks = [clip.tokenize_line(prompt)[0] for prompt in prompts]
        count = max(len(c) for c in chunks)
        empty = clip.tokenize_line("")[0]
        ids = torch.tensor([[chunk.tokens for chunk in c + empty * (count - len(c))] for c in chunks])
        out = self.text_encoder(ids.flatten(0, 1))
        crossattn = out.last_hidden_state.reshape(len(prompts), -1, self.text_encoder.config.hidden_size)
        pooled = out.pooler_output.reshape(len(prompts), count, -1)[:, 0]
        vector = torch.cat([pooled, self.size_features.expand(len(prompts), -1)], dim=1)
        return DictWithShape({"crossattn": crossattn, "vector": vector})
