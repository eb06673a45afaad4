"""ComfyUI's sampler contracts, reproduced for CI (no ComfyUI checkout there).

What is reproduced, after comfy/samplers.py and comfy/model_patcher.py (ComfyUI a125cd84):
- ModelPatcher.clone() deep-copies model_options and copies the wrapper lists;
  set_model_sampler_post_cfg_function appends to model_options["sampler_post_cfg_function"] and
  may set "disable_cfg1_optimization"; add_wrapper_with_key(type, key, fn).
- sampling_function: at cfg == 1 (without disable_cfg1_optimization) the uncond conditioning is
  None, calc_cond_batch returns torch.zeros_like(x) for it; CALC_COND_BATCH wrappers run as
  fn(executor, model, conds, x, timestep, model_options); cfg_function calls each post-CFG
  function with exactly the keys denoised, cond, uncond, cond_scale, model, uncond_denoised,
  cond_denoised, sigma, model_options, input.
- A sampling run puts the schedule into model_options["transformer_options"]["sample_sigmas"]
  of a per-run copy of model_options; the conditionings are per-run lists of dicts whose
  "model_conds" hold CONDCrossAttn objects; everything runs under torch.inference_mode().
- Models are k-diffusion denoisers: apply_model(x, sigma, c_crossattn=...) returns x0 for
  x = x0 + sigma*eps (EPS), or for x = sigma*eps + (1 - sigma)*x0 (CONST, rectified flow).
"""
import copy
import math

import torch


class CONDCrossAttn:
    def __init__(self, cond):
        self.cond = cond

    def _copy_with(self, cond):
        return self.__class__(cond)


class ModelPatcher:
    def __init__(self, model):
        self.model = model
        self.model_options = {"transformer_options": {}}
        self.wrappers = {}

    def clone(self):
        n = ModelPatcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        n.wrappers = {k: {k1: w1.copy() for k1, w1 in w.items()} for k, w in self.wrappers.items()}
        return n

    def set_model_sampler_post_cfg_function(self, fn, disable_cfg1_optimization=False):
        self.model_options.setdefault("sampler_post_cfg_function", []).append(fn)
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def add_wrapper_with_key(self, wrapper_type, key, wrapper):
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)


# -- models -------------------------------------------------------------------------------
class EPS:
    pass


class CONST:
    pass


class ModelSamplingDiscrete(torch.nn.Module, EPS):
    """SD's scaled_linear 0.00085-0.012 schedule over 1000 steps, as sigmas."""

    def __init__(self):
        super().__init__()
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        abar = torch.cumprod(1 - betas, 0)
        self.register_buffer("sigmas", ((1 - abar) / abar).sqrt().float())

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        log_sigmas = self.sigmas.log()
        dists = sigma.log().reshape(-1, 1) - log_sigmas.reshape(1, -1)
        low = dists.ge(0).cumsum(1).argmax(1).clamp(max=len(log_sigmas) - 2)
        w = ((log_sigmas[low] - sigma.log().reshape(-1)) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
        return (1 - w) * low + w * (low + 1)

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        sigma = sigma.reshape(-1, *([1] * (noise.dim() - 1)))
        return noise * (torch.sqrt(1 + sigma ** 2) if max_denoise else sigma) + latent_image


class ModelSamplingFlow(torch.nn.Module, CONST):
    def __init__(self):
        super().__init__()
        self.register_buffer("sigmas", torch.linspace(1e-3, 1.0, 1000))

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        return sigma * 1000

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        sigma = sigma.reshape(-1, *([1] * (noise.dim() - 1)))
        return sigma * noise + (1 - sigma) * latent_image


class BaseModel(torch.nn.Module):
    """A diffusers UNet2DConditionModel as ComfyUI's BaseModel: eps models or rectified flow."""

    def __init__(self, unet, flow=False):
        super().__init__()
        self.diffusion_model = unet
        self.model_sampling = ModelSamplingFlow() if flow else ModelSamplingDiscrete()
        self.flow = flow

    def apply_model(self, x, t, c_crossattn=None, **kwargs):
        sigma = t.reshape(-1, *([1] * (x.dim() - 1)))
        xc = x if self.flow else x / torch.sqrt(sigma ** 2 + 1)
        out = self.diffusion_model(xc, self.model_sampling.timestep(t), encoder_hidden_states=c_crossattn).sample
        return x - out * sigma  # EPS: x - eps*sigma; CONST: x - v*sigma with v = eps - x0


# -- sampling -----------------------------------------------------------------------------
def calc_cond_batch(model, conds, x, timestep, model_options):
    def run(model, conds, x, timestep, model_options):
        out = []
        for cond in conds:
            if cond is None:
                out.append(torch.zeros_like(x))
                continue
            emb = cond[0]["model_conds"]["c_crossattn"].cond
            emb = emb.expand(x.shape[0], -1, -1) if emb.shape[0] == 1 else emb
            out.append(model.apply_model(x, timestep, c_crossattn=emb))
        return out

    call = run
    for wrapper in reversed(model_options["transformer_options"].get("wrappers", {}).get("calc_cond_batch", [])):
        call = (lambda w, inner: lambda *a: w(inner, *a))(wrapper, call)
    return call(model, conds, x, timestep, model_options)


def cfg_function(model, cond_pred, uncond_pred, cond_scale, x, timestep, model_options, cond, uncond):
    cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {"denoised": cfg_result, "cond": cond, "uncond": uncond, "cond_scale": cond_scale, "model": model,
                "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": timestep,
                "model_options": model_options, "input": x}
        cfg_result = fn(args)
    return cfg_result


def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options):
    if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False):
        uncond_ = None
    else:
        uncond_ = uncond
    conds = [cond, uncond_]
    out = calc_cond_batch(model, conds, x, timestep, model_options)
    return cfg_function(model, out[0], out[1], cond_scale, x, timestep, model_options, cond=cond, uncond=uncond_)


def schedule(model, steps):
    """Sigmas evenly spaced in timestep ("normal"-like), ending at 0."""
    ms = model.model_sampling
    idx = torch.linspace(len(ms.sigmas) - 1, 0, steps).round().long()
    return torch.cat([ms.sigmas[idx], torch.zeros(1)])


def conditioning(embedding):
    return [{"model_conds": {"c_crossattn": CONDCrossAttn(embedding)}}]


def sample(patcher, noise, positive, negative, cfg=7.5, steps=4, sampler="euler"):
    """A full-denoise run like KSampler: returns the final latent."""
    with torch.inference_mode():
        model = patcher.model
        sigmas = schedule(model, steps)
        model_options = copy.deepcopy(patcher.model_options)
        model_options["transformer_options"]["wrappers"] = {
            k: [fn for fns in w.values() for fn in fns] for k, w in patcher.wrappers.items()}
        model_options["transformer_options"]["sample_sigmas"] = sigmas
        conds = {"positive": conditioning(positive), "negative": conditioning(negative)}
        x = model.model_sampling.noise_scaling(sigmas[:1], noise, torch.zeros_like(noise), max_denoise=True)

        def denoise(x, sigma):
            t = sigma.expand(x.shape[0])
            return sampling_function(model, x, t, conds["negative"], conds["positive"], cfg, model_options)

        for i in range(steps):
            s, s_next = sigmas[i], sigmas[i + 1]
            d = (x - denoise(x, s)) / s
            if sampler == "heun" and s_next > 0:
                x_euler = x + d * (s_next - s)
                d = (d + (x_euler - denoise(x_euler, s_next)) / s_next) / 2
            x = x + d * (s_next - s)
        return x


def tiny_unet(seed=0):
    """The bundled model's UNet architecture (random weights: the contracts do not need training)."""
    from memoguard.tiny.train import build_models
    torch.manual_seed(seed)
    unet, text_encoder = build_models()
    return unet.eval(), text_encoder.eval()
