"""The bundled tiny memorizing model as ComfyUI's own MODEL, CLIP and VAE objects.

The folder is a diffusers pipeline (memoguard/assets/tiny-sd): a pixel-space UNet2DConditionModel
(3x16x16), a 2-layer CLIPTextModel of width 64 with CLIP's BPE tokenizer, and SD's discrete
scaled_linear schedule. ComfyUI cannot detect such a small checkpoint, so the objects are built
here: the SD1.5 model class with a small UNet config, ComfyUI's key map from diffusers names,
comfy.sd1_clip with this text encoder's config and tokenizer, and ComfyUI's pixel-space VAE.
Imports ComfyUI only when called.
"""
import json
from functools import partial
from pathlib import Path

import torch

from memoguard.errors import MemoGuardError
from memoguard.resources import asset_path

BUNDLED = asset_path("tiny-sd")
# The workflows feed this 16x16-pixel model an Empty Latent Image of 128x128, i.e. a 16x16 latent.
# ComfyUI 0.33 resizes an empty latent by (the latent node's downscale ratio, 8) / (the model's
# latent format's): declaring 8 keeps it 16x16 there, as v0.3.64 (which never resizes) samples it.
SPACIAL_DOWNSCALE = 8


class TinyModelError(MemoGuardError, RuntimeError):
    pass


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TinyModelError(f"{path} is missing: is {path.parents[1]} a MemoGuard tiny model folder?") from None


def _load_weights(folder: Path) -> dict:
    import safetensors.torch
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise TinyModelError(f"no .safetensors weights in {folder}")
    return safetensors.torch.load_file(str(files[0]))


def unet_config_for(diffusers_config: dict) -> dict:
    """ComfyUI's openaimodel config for a diffusers UNet2DConditionModel of the tiny layout."""
    levels = len(diffusers_config["block_out_channels"])
    base = diffusers_config["block_out_channels"][0]
    has_attention = ["CrossAttn" in t for t in diffusers_config["down_block_types"]]
    per_level = diffusers_config.get("layers_per_block", 2)
    return {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "in_channels": diffusers_config["in_channels"], "out_channels": diffusers_config["out_channels"],
        "model_channels": base, "channel_mult": [c // base for c in diffusers_config["block_out_channels"]],
        "num_res_blocks": [per_level] * levels,
        "transformer_depth": [int(a) for a in has_attention for _ in range(per_level)],
        "transformer_depth_output": [int(a) for a in has_attention for _ in range(per_level + 1)],
        "transformer_depth_middle": 1, "context_dim": diffusers_config["cross_attention_dim"],
        "num_heads": diffusers_config["attention_head_dim"], "num_head_channels": -1,
        "use_linear_in_transformer": diffusers_config.get("use_linear_projection", False),
        "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def tiny_latent_format(pixel_format):
    """ComfyUI's pixel-space latent format (3 channels, values as is) sized like Empty Latent Image's."""
    return type("MemoGuardTinyPixels", (pixel_format,), {"spacial_downscale_ratio": SPACIAL_DOWNSCALE})()


def load_model(folder: Path = BUNDLED):
    import comfy.latent_formats
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    folder = Path(folder)
    diffusers_config = _read_json(folder / "unet" / "config.json")
    unet_config = unet_config_for(diffusers_config)
    model_config = comfy.supported_models.SD15(unet_config)
    model_config.latent_format = tiny_latent_format(comfy.latent_formats.ChromaRadiance)
    model = model_config.get_model({})
    key_map = comfy.utils.unet_to_diffusers(unet_config)
    weights = _load_weights(folder / "unet")
    state = {key_map[k]: v for k, v in weights.items() if k in key_map}
    missing, unexpected = model.diffusion_model.load_state_dict(state, strict=False)
    unmapped = [k for k in weights if k not in key_map]
    if missing or unexpected or unmapped:
        raise TinyModelError(f"UNet weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                             f"unmapped {unmapped[:5]}")
    groups = diffusers_config.get("norm_num_groups", 32)
    for module in model.diffusion_model.modules():  # ComfyUI's UNet hard-codes 32 groups
        if isinstance(module, torch.nn.GroupNorm):
            module.num_groups = groups
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    # ComfyUI 0.33 builds a fresh copy from a loader's factory where it needs one (Train LoRA does)
    patcher.cached_patcher_init = (_fresh_model, (str(folder),))
    return patcher


def _fresh_model(folder: str, disable_dynamic: bool = False):
    return load_model(Path(folder))


def load_clip(folder: Path = BUNDLED):
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    folder = Path(folder)
    text_config = _read_json(folder / "text_encoder" / "config.json")
    width = text_config["hidden_size"]
    tokenizer = partial(comfy.sd1_clip.SD1Tokenizer, tokenizer=partial(
        comfy.sd1_clip.SDTokenizer, tokenizer_path=str(folder / "tokenizer"), embedding_size=width))
    clip_model = partial(comfy.sd1_clip.SD1ClipModel, clip_model=partial(
        comfy.sd1_clip.SDClipModel, textmodel_json_config=text_config, return_projected_pooled=False))
    # float32: ComfyUI's default fp16 text encoder would shift every score of a model this small
    clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(tokenizer, clip_model), model_options={"dtype": torch.float32})
    # transformers saves CLIPTextModel keys with or without the "text_model." prefix, by version
    weights = {"clip_l.transformer." + (k if k.startswith("text_model.") else f"text_model.{k}"): v
               for k, v in _load_weights(folder / "text_encoder").items()}
    missing, unexpected = clip.load_sd(weights, full_model=True)
    missing = [k for k in missing if "text_projection" not in k and "logit_scale" not in k]
    if missing or unexpected:
        raise TinyModelError(f"text encoder weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return clip


def load_vae():
    import comfy.sd
    return comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
