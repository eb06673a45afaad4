"""Forge glue: the post-CFG patch that scores, Forge's UNet as a `memoguard.DiffusionModel`, the negative prompt's
pass MemoGuard runs itself at CFG scale 1, and Forge's prompt encoding for re-encoding.

Forge fires on_cfg_denoiser but never on_cfg_denoised; its sampling function (ComfyUI-like)
runs the functions in `forge_objects.unet.model_options["sampler_post_cfg_function"]` with
cond_denoised / uncond_denoised (denoised x0 at x = x0 + sigma*eps; rectified flow:
x = sigma*eps + (1 - sigma)*x0) and skips the uncond pass whenever the CFG scale is 1 (also
under NGMS and Skip Early CFG), handing over zeros. `forge_objects` is reset from
`forge_objects_after_applying_lora` before every sampling, so the patch is re-applied per
sampling, on a clone. Forge samples under torch.inference_mode: gradients go through
memoguard.host_autograd.
"""
import importlib.util

import torch

from dataclasses import replace

from memoguard.hosts import (WebUIPromptText, chunked_encoding, coefficients_kdiffusion, denoised_difference,
                             empty_encoding)
from memoguard.model import Denoiser

from .host_model import ReencodesPrompts, cond_embedding, row_tokens, split_words


def is_forge() -> bool:
    return importlib.util.find_spec("modules_forge") is not None


def host_name() -> str:
    """a1111 | forge | forge-neo, as calibrations record the host (Forge Neo's modules_forge.forge_version says
    "neo")."""
    if not is_forge():
        return "a1111"
    try:
        from modules_forge import forge_version
    except ImportError:
        return "forge"
    return "forge-neo" if getattr(forge_version, "version", "") == "neo" else "forge"


def forge_objects(denoiser):
    """The ForgeObjects Forge's sampling function reads its UnetPatcher from (the sampler's shared.sd_model)."""
    return denoiser.inner_model.inner_model.forge_objects


def forge_unet(denoiser):
    return forge_objects(denoiser).unet


def install_post_cfg(denoiser, hook) -> None:
    """Clone-then-patch the UNet this sampling uses, once (a deep-copied model_options keeps a plain function)."""
    objects = forge_objects(denoiser)
    if hook in objects.unet.model_options.get("sampler_post_cfg_function", []):
        return
    patched = objects.unet.clone()
    patched.set_model_sampler_post_cfg_function(hook)
    objects.unet = patched


def is_rectified_flow(kmodel) -> bool:
    return getattr(kmodel.predictor, "prediction_type", None) == "const"


def guided_difference(args: dict) -> torch.Tensor:
    """eps_c - eps_u per image from a post-CFG call, scaled as Forge's CFG scales AND prompts (edit strength)."""
    diff = denoised_difference(args["cond_denoised"], args["uncond_denoised"], args["sigma"])
    strength = sum(item.get("strength", 1) for item in args["cond"])
    return diff if strength == 1 else strength * diff


PROMPT_FAMILIES = "SD1.x, SD2.x and SDXL only; ComfyUI explains and mitigates flow models"


def check_supported(kmodel) -> None:
    """Explanation and the prompt strategies map embedding positions to CLIP tokens: not on Forge's flow models,
    whose text engines (T5, Qwen, Gemma, an adapter's rows) the WebUI does not lay out as words."""
    if is_rectified_flow(kmodel):
        raise ValueError(f"{type(kmodel.diffusion_model).__name__} is a rectified-flow model: in the WebUI token "
                         f"explanation and the prompt strategies support {PROMPT_FAMILIES}; the score, calibration "
                         "and the schedules (opposite_guidance, guidance_delay) work on it")


class ForgeModel(ReencodesPrompts, Denoiser):
    """Forge's KModel (UNet + predictor) at the sampler's current step: apply_model(x, sigma, c_crossattn=...)
    returns denoised x0.

    Not for rectified-flow models (check_supported first). ControlNet and model_options patches
    (FreeU, attention patches) are not applied here: the gradient features see the checkpoint's own UNet.
    """

    parameterization = "x0"

    def __init__(self, kmodel):
        self.kmodel = kmodel

    def raw_prediction(self, x, t, embedding, extra):
        return self.kmodel.apply_model(x, t, c_crossattn=embedding, transformer_options={}, **extra)

    def coefficients(self, t):
        return coefficients_kdiffusion(t)


def text_engine(sd_model):
    """Forge's prompt tokenizer: SD1/SD2 `text_processing_engine`, SDXL `text_processing_engine_l` (CLIP-L)."""
    engine = getattr(sd_model, "text_processing_engine", None) or getattr(sd_model, "text_processing_engine_l", None)
    if engine is None:
        raise ValueError(f"token explanation and mitigation support SD1, SD2 and SDXL checkpoints on Forge, "
                         f"not {type(sd_model).__name__}")
    return engine


def _model_extras(params, unet, rows: list, x: torch.Tensor) -> dict:
    """The conditioning Forge adds beside the prompt: SDXL's pooled vector (y), an inpainting model's c_concat."""
    extra = {}
    image_cond = unet.extra_concat_condition if unet.extra_concat_condition is not None else params.image_cond
    if isinstance(image_cond, torch.Tensor) and image_cond.shape[0] == x.shape[0] and image_cond.shape[2:] == x.shape[2:]:
        extra["c_concat"] = image_cond[rows]
    return extra


def prompt_encodings(p, params, layout, iteration: int, copy, text_uncond=None):
    """(cond, uncond, x) for the cond rows of this CFG call; `copy` makes host tensors autograd-safe; text_uncond:
    the negative conditioning where Forge made none (CFG scale 1: negative_conditioning).

    On Forge the callback sees one x row per image (not A1111's cond rows + uncond rows).
    """
    text_uncond = params.text_uncond if params.text_uncond is not None else text_uncond
    if text_uncond is None:
        raise ValueError("Forge encodes no negative prompt at CFG scale 1 and MemoGuard's own encoding of it is not "
                         "there (a flow model, or it failed): token explanation and mitigation need a CFG scale "
                         "other than 1 here")
    unet = forge_unet(params.denoiser)
    image_of_row = [i for i, rows in enumerate(layout) for _ in rows]
    emb = copy(cond_embedding(params.text_cond))
    uncond_emb = copy(cond_embedding(text_uncond))[image_of_row]
    x = copy(params.x)
    cond_extra = {k: copy(v) for k, v in _model_extras(params, unet, image_of_row, x).items()}
    uncond_extra = dict(cond_extra)
    if isinstance(params.text_cond, dict):
        cond_extra["y"] = copy(params.text_cond["vector"])
        uncond_extra["y"] = copy(text_uncond["vector"])[image_of_row]
    engine = text_engine(params.denoiser.inner_model.inner_model)
    tokens, prompt_mask, words, texts = row_tokens(p, layout, iteration, emb.shape[1], engine, engine.tokenizer)
    cond = replace(chunked_encoding(emb, tokens, prompt_mask, cond_extra, words), texts=texts)
    return cond, empty_encoding(uncond_emb, uncond_extra), x[image_of_row]


def negative_conditioning(p, params, unet):
    """At CFG scale 1 Forge does not encode the negative prompts: their conditioning (one row per image) through
    Forge's own get_learned_conditioning, the UNet loaded back after the text encoder."""
    from backend import memory_management
    from modules import prompt_parser
    negatives = list(getattr(p, "negative_prompts", None) or [p.negative_prompt] * params.x.shape[0])
    sd_model = params.denoiser.inner_model.inner_model
    cond = sd_model.get_learned_conditioning(prompt_parser.SdConditioning(negatives, is_negative_prompt=True,
                                                                          width=p.width, height=p.height))
    memory_management.load_model_gpu(unet)
    return cond


def negative_prediction(params, unet, cond) -> torch.Tensor:
    """At CFG scale 1 Forge runs no negative pass: the KModel's prediction for this step's x (one row per image)
    under the negative conditioning `cond`, as ForgeModel calls it (ControlNet and model_options patches not
    applied)."""
    x = params.x
    extra = _model_extras(params, unet, list(range(x.shape[0])), x)
    if isinstance(cond, dict):  # the model inputs Forge's compile_conditions makes of it
        extra["y"] = cond["vector"]
        if "guidance" in cond:  # Flux dev's distilled guidance
            extra["guidance"] = cond["guidance"]
    return unet.model.apply_model(x, params.sigma, c_crossattn=cond_embedding(cond), transformer_options={}, **extra)


def forge_prompt_text(p, denoiser, unet, copy) -> WebUIPromptText:
    """Forge's emphasis parser and its model's get_learned_conditioning at the first pass's size; `copy` makes its
    inference-mode output usable. Encoding loads the text encoder; where that moved the sampling UNet off the GPU
    (low VRAM) it is loaded back before the sampler's next step."""
    from backend import memory_management
    from backend.text_processing import parsing
    from modules import prompt_parser, shared
    sd_model = denoiser.inner_model.inner_model
    emphasis = getattr(shared.opts, "emphasis", "Original")

    def encode(texts):
        cond = sd_model.get_learned_conditioning(prompt_parser.SdConditioning(texts, width=p.width, height=p.height))
        memory_management.load_model_gpu(unet)
        if isinstance(cond, dict):
            return copy(cond["crossattn"]), {"y": copy(cond["vector"])}
        return copy(cond), {}

    engine = text_engine(sd_model)
    return WebUIPromptText(lambda text: parsing.parse_prompt_attention(text, emphasis),
                           split_words(engine.tokenizer, engine), encode, escape=emphasis != "None")
