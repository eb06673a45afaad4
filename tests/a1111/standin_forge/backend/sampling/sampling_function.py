"""Stand-in for backend/sampling/sampling_function.py: Forge's CFG with ComfyUI-like post-CFG functions.

Same contract as Forge: the UnetPatcher is read from the denoiser's sd_model at every call; AND
sub-prompts become cond entries with a 'strength' (averaged into cond_pred, CFG scaled by their
sum), each entry's 'model_conds' going to KModel.apply_model as keywords (SDXL's dict conds: c_crossattn
= "crossattn", y = "vector"); at CFG scale 1 the uncond pass is skipped and uncond_pred stays zeros; each post-CFG
function gets the args dict below and returns the denoised result.
"""
import math

import torch


def compile_conditions(cond):
    """One entry for a batch of conditioning: a tensor (SD1/SD2) or a {"crossattn", "vector"} dict (SDXL)."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return [{"model_conds": {"c_crossattn": cond["crossattn"], "y": cond["vector"]}}]
    return [{"model_conds": {"c_crossattn": cond}}]


def compile_weighted_conditions(cond, cond_composition):
    """One entry per sub-prompt index: the rows of every image, with the (last image's) weight."""
    entries = []
    for per_image in map(list, zip(*cond_composition)):
        rows = [row for row, _ in per_image]
        (entry,) = compile_conditions({k: v[rows] for k, v in cond.items()} if isinstance(cond, dict) else cond[rows])
        entries.append({**entry, "strength": per_image[-1][1]})
    return entries


def calc_cond_uncond_batch(model, cond, uncond, x, timestep, model_options):
    def predict(entry):
        return model.apply_model(x, timestep, transformer_options=dict(model_options["transformer_options"]),
                                 **entry["model_conds"])
    out_cond = torch.zeros_like(x)
    count = torch.ones_like(x) * 1e-37
    for entry in cond:
        out_cond += predict(entry) * entry["strength"]
        count += entry["strength"]
    out_uncond = torch.zeros_like(x)
    for entry in uncond or []:
        out_uncond += predict(entry)
    return out_cond / count, out_uncond


def sampling_function(self, denoiser_params, cond_scale, cond_composition):
    unet_patcher = self.inner_model.inner_model.forge_objects.unet
    model, model_options = unet_patcher.model, unet_patcher.model_options
    x, timestep = denoiser_params.x, denoiser_params.sigma
    cond = compile_weighted_conditions(denoiser_params.text_cond, cond_composition)
    # compiled even when its pass is skipped (NGMS), None when there is no negative prompt (CFG scale 1)
    uncond = compile_conditions(denoiser_params.text_uncond)
    edit_strength = sum(item.get("strength", 1) for item in cond)
    skip_uncond = math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False)
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, None if skip_uncond else uncond, x, timestep,
                                                    model_options)
    if not math.isclose(edit_strength, 1.0):
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength
    else:
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {"denoised": cfg_result, "cond": cond, "uncond": uncond, "model": model, "uncond_denoised": uncond_pred,
                "cond_denoised": cond_pred, "sigma": timestep, "model_options": model_options, "input": x}
        cfg_result = fn(args)
    return cfg_result, cond_pred, uncond_pred
