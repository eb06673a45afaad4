"""Stand-in for backend/sampling/sampling_function.py: Forge's CFG with ComfyUI-like post-CFG functions.

Same contract as Forge: the UnetPatcher is read from the denoiser's sd_model at every call; AND
sub-prompts become cond entries with a 'strength' (averaged into cond_pred, CFG scaled by their
sum); at CFG scale 1 the uncond pass is skipped and uncond_pred stays zeros; each post-CFG
function gets the args dict below and returns the denoised result.
"""
import math

import torch


def compile_weighted_conditions(cond, cond_composition):
    """One entry per sub-prompt index: the rows of every image, with the (last image's) weight."""
    entries = []
    for per_image in map(list, zip(*cond_composition)):
        entries.append({"rows": [row for row, _ in per_image], "strength": per_image[-1][1]})
    return entries


def calc_cond_uncond_batch(model, cond, tensor, uncond, x, timestep, model_options):
    out_cond = torch.zeros_like(x)
    count = torch.ones_like(x) * 1e-37
    for entry in cond:
        out_cond += model.apply_model(x, timestep, c_crossattn=tensor[entry["rows"]],
                                      transformer_options=dict(model_options["transformer_options"])) * entry["strength"]
        count += entry["strength"]
    out_uncond = torch.zeros_like(x)
    if uncond is not None:
        out_uncond += model.apply_model(x, timestep, c_crossattn=uncond,
                                        transformer_options=dict(model_options["transformer_options"]))
    return out_cond / count, out_uncond


def sampling_function(self, denoiser_params, cond_scale, cond_composition):
    unet_patcher = self.inner_model.inner_model.forge_objects.unet
    model, model_options = unet_patcher.model, unet_patcher.model_options
    x, timestep = denoiser_params.x, denoiser_params.sigma
    uncond_tensor = denoiser_params.text_uncond
    cond = compile_weighted_conditions(denoiser_params.text_cond, cond_composition)
    # compiled even when its pass is skipped (NGMS), None when there is no negative prompt (CFG scale 1)
    uncond = None if uncond_tensor is None else [{"rows": list(range(x.shape[0]))}]
    edit_strength = sum(item.get("strength", 1) for item in cond)
    skip_uncond = math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False)
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, denoiser_params.text_cond,
                                                    None if skip_uncond else uncond_tensor, x, timestep, model_options)
    if not math.isclose(edit_strength, 1.0):
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength
    else:
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {"denoised": cfg_result, "cond": cond, "uncond": uncond, "model": model, "uncond_denoised": uncond_pred,
                "cond_denoised": cond_pred, "sigma": timestep, "model_options": model_options, "input": x}
        cfg_result = fn(args)
    return cfg_result, cond_pred, uncond_pred
