"""Which model the WebUI samples with: memoguard.identity's weights fingerprint of its denoiser, cached.

The key must describe the weights the sampler actually uses. A1111's built-in Lora merges its
weights into the UNet lazily, in the first forward of a generation, and Forge patches them in
when it loads the UNet for sampling; so the key is taken after the first model call of a run
(or of a calibration). Fingerprinting reads a few hundred values per tensor (milliseconds); the
result is cached per denoiser module and "what could have changed its weights" (checkpoint, the
networks A1111 has loaded, the LoRA patches on Forge's and Forge Neo's UNet), so a run's per-step cost is nil.
"""
import sys

from memoguard.identity import cached_fingerprint


def denoiser_module(sd_model, unet_patcher=None):
    """The UNet (or DiT) the sampler calls: A1111 sd_model.model.diffusion_model; Forge the KModel's."""
    if unet_patcher is None and getattr(sd_model, "forge_objects", None) is not None:
        unet_patcher = sd_model.forge_objects.unet
    if unet_patcher is not None:
        return unet_patcher.model.diffusion_model
    return sd_model.model.diffusion_model


def _signature(sd_model, unet_patcher=None):
    info = getattr(sd_model, "sd_checkpoint_info", None)
    checkpoint = tuple(str(getattr(info, k, None)) for k in ("filename", "sha256", "model_name"))
    networks = sys.modules.get("networks")  # A1111's extensions-builtin/Lora
    loaded = tuple((str(getattr(n, "name", n)), getattr(n, "te_multiplier", None), getattr(n, "unet_multiplier", None),
                    getattr(n, "dyn_dim", None)) for n in (getattr(networks, "loaded_networks", None) or ()))
    patches = tuple(sorted(repr(k) for k in (getattr(unet_patcher, "lora_patches", None) or {})))
    # Forge Neo keeps LoRA weights in `patches`, renamed by a new patches_uuid whenever they change
    return checkpoint, loaded, patches, str(getattr(unet_patcher, "patches_uuid", ""))


def model_key(sd_model, unet_patcher=None) -> str:
    """'unet-<16 hex>' of the weights the sampler uses now (call after the run's first model call)."""
    return cached_fingerprint(denoiser_module(sd_model, unet_patcher), _signature(sd_model, unet_patcher))


def checkpoint_name(sd_model) -> str:
    info = getattr(sd_model, "sd_checkpoint_info", None)
    return str(getattr(info, "name_for_extra", None) or getattr(info, "model_name", None) or "")
