"""The latent a sampler really starts from, for nodes that sample or score beside KSampler.

KSampler (nodes.common_ksampler) does not use an empty LATENT as it comes: comfy.sample's
fix_empty_latent_channels gives it the model's channel count and, from ComfyUI 0.33 on, resizes it
by the ratio the latent node declares (`downscale_ratio_spacial`, 8 for Empty Latent Image) over
the model's latent format's. A node that explains or calibrates "at the size you sample at" must
make the same latent, on either version.
"""
import inspect


def sampler_latent(model, latent: dict, fix_empty_latent_channels=None):
    """latent["samples"] as KSampler would sample it with `model` (a ModelPatcher)."""
    if fix_empty_latent_channels is None:
        import comfy.sample
        fix_empty_latent_channels = comfy.sample.fix_empty_latent_channels
    samples = latent["samples"]
    params = inspect.signature(fix_empty_latent_channels).parameters
    if "downscale_ratio_spacial" not in params:  # ComfyUI before the resize (v0.3.64)
        return fix_empty_latent_channels(model, samples)
    return fix_empty_latent_channels(model, samples, latent.get("downscale_ratio_spacial", None),
                                     latent.get("downscale_ratio_temporal", None))
