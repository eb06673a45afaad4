"""ComfyUI's sampler contracts, reproduced for CI (no ComfyUI checkout there).

What is reproduced, after comfy/samplers.py and comfy/model_patcher.py (ComfyUI a125cd84):
- ModelPatcher.clone() deep-copies model_options and copies the wrapper lists;
  set_model_sampler_post_cfg_function appends to model_options["sampler_post_cfg_function"] and
  may set "disable_cfg1_optimization"; add_wrapper_with_key(type, key, fn).
- CFGGuider.predict_noise runs inside the PREDICT_NOISE wrappers, fn(executor, x, timestep, model_options, seed)
  with the guider as executor.class_obj (its conds, cfg, inner_model).
- sampling_function: at cfg == 1 (without disable_cfg1_optimization) the uncond conditioning is
  None, calc_cond_batch returns torch.zeros_like(x) for it; CALC_COND_BATCH wrappers run as
  fn(executor, model, conds, x, timestep, model_options); cfg_function calls each post-CFG
  function with exactly the keys denoised, cond, uncond, cond_scale, model, uncond_denoised,
  cond_denoised, sigma, model_options, input.
- A sampling run puts the schedule into model_options["transformer_options"]["sample_sigmas"]
  of a per-run copy of model_options; the conditionings are per-run lists of dicts whose
  "model_conds" hold CONDCrossAttn objects; everything runs under torch.inference_mode().
- Models are k-diffusion denoisers: apply_model(x, sigma, c_crossattn=..., **other model_conds)
  returns x0 for x = x0 + sigma*eps (EPS), or for x = sigma*eps + (1 - sigma)*x0 (CONST, rectified flow).
- CONDITIONING is [[cond, {"pooled_output": ...}]]; before sampling each entry becomes
  {**options, "cross_attn": cond, "model_conds": ...} (sampler_helpers.convert_cond) and
  encode_model_conds calls model.extra_conds(**entry, device, noise, width=latent W*8,
  height=latent H*8, prompt_type="positive"/"negative"); extra_conds returns CONDs:
  c_crossattn, and y for SDXL = [pooled, Timestep(256) of height, width, crop_h, crop_w,
  target_height, target_width] (model_base.SDXL.encode_adm).
- CLIP: tokenize(text, return_word_ids=True) -> {"l": [[(id, weight, word_id) x 77], ...]};
  tokenizer.untokenize(pairs) -> [(pair, "word</w>")]; encode_from_tokens_scheduled(tokens)
  -> [[cond, {"pooled_output": pooled}]].
"""
import contextlib
import copy
import enum
import math

import torch


class CONDRegular:
    def __init__(self, cond):
        self.cond = cond

    def _copy_with(self, cond):
        return self.__class__(cond)


class CONDCrossAttn(CONDRegular):
    pass


class ModelPatcher:
    load_device = torch.device("cpu")

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

    def set_model_unet_function_wrapper(self, fn):
        self.model_options["model_function_wrapper"] = fn

    def get_model_object(self, name):
        return getattr(self.model, name)

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

    def percent_to_sigma(self, percent):  # 0 -> the largest sigma, 1 -> 0, as Train LoRA draws its noise levels
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        t = (1 - percent) * 999
        low = min(int(t), 998)
        w = t - low
        return float(((1 - w) * self.sigmas[low].log() + w * self.sigmas[low + 1].log()).exp())


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


class ModelType(enum.Enum):  # comfy.model_base.ModelType (the members used here)
    EPS = 1
    V_PREDICTION = 2
    FLOW = 6


class LatentFormat:  # comfy.latent_formats (0.33.0 has spacial_downscale_ratio; v0.3.64 does not)
    latent_channels = 4
    latent_dimensions = 2
    spacial_downscale_ratio = 8


class ChromaRadiance(LatentFormat):
    latent_channels = 3
    spacial_downscale_ratio = 1


def fix_empty_latent_channels_v0364(model, latent_image):
    """comfy/sample.py at v0.3.64: channels only."""
    latent_format = model.get_model_object("latent_format")
    if latent_format.latent_channels != latent_image.shape[1] and torch.count_nonzero(latent_image) == 0:
        latent_image = _repeat_to(latent_image, latent_format.latent_channels)
    return latent_image


def fix_empty_latent_channels_033(model, latent_image, downscale_ratio_spacial=None, downscale_ratio_temporal=None):
    """comfy/sample.py at 0.33.0: channels, then an empty latent resized by the latent node's downscale ratio
    over the model's latent format's (nearest-exact)."""
    latent_format = model.get_model_object("latent_format")
    if torch.count_nonzero(latent_image) == 0:
        if latent_format.latent_channels != latent_image.shape[1]:
            latent_image = _repeat_to(latent_image, latent_format.latent_channels)
        if downscale_ratio_spacial is not None and downscale_ratio_spacial != latent_format.spacial_downscale_ratio:
            ratio = downscale_ratio_spacial / latent_format.spacial_downscale_ratio
            size = (round(latent_image.shape[-2] * ratio), round(latent_image.shape[-1] * ratio))
            latent_image = torch.nn.functional.interpolate(latent_image, size=size, mode="nearest-exact")
    return latent_image


def _repeat_to(tensor, channels):  # comfy.utils.repeat_to_batch_size on dim 1
    if tensor.shape[1] > channels:
        return tensor.narrow(1, 0, channels)
    return tensor.repeat(1, math.ceil(channels / tensor.shape[1]), 1, 1).narrow(1, 0, channels)


def empty_latent_image(width, height, batch_size=1, version="0.33.0"):
    """EmptyLatentImage: 4 x H/8 x W/8 zeros; 0.33.0 adds downscale_ratio_spacial 8."""
    latent = {"samples": torch.zeros(batch_size, 4, height // 8, width // 8)}
    return {**latent, "downscale_ratio_spacial": 8} if version == "0.33.0" else latent


class BaseModel(torch.nn.Module):
    """A diffusers UNet2DConditionModel as ComfyUI's BaseModel: eps models or rectified flow."""

    def __init__(self, unet, flow=False):
        super().__init__()
        self.diffusion_model = unet
        self.model_sampling = ModelSamplingFlow() if flow else ModelSamplingDiscrete()
        self.model_type = ModelType.FLOW if flow else ModelType.EPS
        self.latent_format = LatentFormat()
        self.flow = flow

    def apply_model(self, x, t, c_crossattn=None, y=None):
        sigma = t.reshape(-1, *([1] * (x.dim() - 1)))
        xc = x if self.flow else x / torch.sqrt(sigma ** 2 + 1)
        out = self.diffusion_model(xc, self.model_sampling.timestep(t), encoder_hidden_states=c_crossattn,
                                   class_labels=y).sample
        return x - out * sigma  # EPS: x - eps*sigma; CONST: x - v*sigma with v = eps - x0

    def process_latent_in(self, latent):
        return latent

    def encode_adm(self, **kwargs):
        return None

    def extra_conds(self, **kwargs):
        out = {}
        adm = self.encode_adm(**kwargs)
        if adm is not None:
            out["y"] = CONDRegular(adm)
        if kwargs.get("cross_attn") is not None:
            out["c_crossattn"] = CONDCrossAttn(kwargs["cross_attn"])
        return out


def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class SDXL(BaseModel):
    """SDXL's conditioning: y = pooled text ++ six 256-wide sinusoidal size embeddings."""

    SIZE_CHANNELS = 6 * 256

    def encode_adm(self, **kwargs):
        pooled = kwargs["pooled_output"]
        width, height = kwargs.get("width", 768), kwargs.get("height", 768)
        sizes = [height, width, kwargs.get("crop_h", 0), kwargs.get("crop_w", 0),
                 kwargs.get("target_height", height), kwargs.get("target_width", width)]
        flat = torch.flatten(torch.cat([timestep_embedding(torch.Tensor([v]), 256) for v in sizes]))
        return torch.cat((pooled, flat.unsqueeze(0).repeat(pooled.shape[0], 1)), dim=1)


# -- sampling -----------------------------------------------------------------------------
def calc_cond_batch(model, conds, x, timestep, model_options):
    def run(model, conds, x, timestep, model_options):
        out = []
        for cond in conds:
            if cond is None:
                out.append(torch.zeros_like(x))
                continue
            inputs = {k: v.cond.expand(x.shape[0], *v.cond.shape[1:]) if v.cond.shape[0] == 1 else v.cond
                      for k, v in cond[0]["model_conds"].items()}
            wrapper = model_options.get("model_function_wrapper")
            out.append(model.apply_model(x, timestep, **inputs) if wrapper is None else
                       wrapper(model.apply_model, {"input": x, "timestep": timestep, "c": inputs, "cond_or_uncond": [0]}))
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


class Executor:
    """A wrapper's view of the call it wraps: callable, and the object whose method it is (class_obj)."""

    def __init__(self, call, class_obj):
        self.call, self.class_obj = call, class_obj

    def __call__(self, *args):
        return self.call(*args)


class Guider:
    """CFGGuider: its processed conds ("positive", "negative" when the sampler has one), cfg and inner_model;
    predict_noise runs sampling_function inside the PREDICT_NOISE wrappers, which see it as executor.class_obj."""

    def __init__(self, inner_model, conds, cfg):
        self.inner_model, self.conds, self.cfg = inner_model, conds, cfg

    def predict_noise(self, x, timestep, model_options, seed=None):
        return sampling_function(self.inner_model, x, timestep, self.conds.get("negative"), self.conds["positive"],
                                 self.cfg, model_options)

    def __call__(self, x, timestep, model_options, seed=None):
        call = self.predict_noise
        for wrapper in reversed(model_options["transformer_options"].get("wrappers", {}).get("predict_noise", [])):
            call = (lambda w, inner: lambda *a: w(Executor(inner, self), *a))(wrapper, call)
        return call(x, timestep, model_options, seed)


def schedule(model, steps):
    """Sigmas evenly spaced in timestep ("normal"-like), ending at 0."""
    ms = model.model_sampling
    idx = torch.linspace(len(ms.sigmas) - 1, 0, steps).round().long()
    return torch.cat([ms.sigmas[idx], torch.zeros(1)])


def model_conds(model, conditioning, noise, prompt_type):
    """A CONDITIONING as the sampler hands it to calc_cond_batch (convert_cond + encode_model_conds)."""
    if isinstance(conditioning, torch.Tensor):
        conditioning = [[conditioning, {}]]
    out = []
    for cond, options in conditioning:
        entry = {**options, "cross_attn": cond, "model_conds": {}}
        params = {**entry, "device": noise.device, "noise": noise, "width": entry.get("width", noise.shape[3] * 8),
                  "height": entry.get("height", noise.shape[2] * 8), "prompt_type": entry.get("prompt_type", prompt_type)}
        out.append({**entry, "model_conds": model.extra_conds(**params)})
    return out


def sample(patcher, noise, positive, negative, cfg=7.5, steps=4, sampler="euler", sigmas=None):
    """A full-denoise run like KSampler: returns the final latent. positive/negative: CONDITIONING or a tensor;
    negative None: a guider without one (BasicGuider)."""
    with torch.inference_mode():
        model = patcher.model
        sigmas = schedule(model, steps) if sigmas is None else sigmas
        steps = len(sigmas) - 1
        model_options = copy.deepcopy(patcher.model_options)
        model_options["transformer_options"]["wrappers"] = {
            k: [fn for fns in w.values() for fn in fns] for k, w in patcher.wrappers.items()}
        model_options["transformer_options"]["sample_sigmas"] = sigmas
        conds = {"positive": model_conds(model, positive, noise, "positive")}
        if negative is not None:  # BasicGuider: no negative
            conds["negative"] = model_conds(model, negative, noise, "negative")
        max_denoise = math.isclose(float(model.model_sampling.sigma_max), float(sigmas[0]), rel_tol=1e-5) or \
            float(sigmas[0]) > float(model.model_sampling.sigma_max)  # KSampler.max_denoise
        x = model.model_sampling.noise_scaling(sigmas[:1], noise, torch.zeros_like(noise), max_denoise=max_denoise)

        guider = Guider(model, conds, cfg)

        def denoise(x, sigma):
            return guider(x, sigma.expand(x.shape[0]), model_options)

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


def tiny_sdxl_unet(pooled_channels=64, seed=0):
    """The tiny UNet with SDXL's y input: an ADM projection of pooled text + size embeddings."""
    from diffusers import UNet2DConditionModel
    unet, _ = tiny_unet(seed)
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}  # "_use_default_values" would undo ours
    config.update(class_embed_type="projection", projection_class_embeddings_input_dim=pooled_channels + SDXL.SIZE_CHANNELS)
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


class CLIP:
    """ComfyUI's CLIP object over the bundled tokenizer and a transformers CLIPTextModel: 75 tokens a 77-slot
    chunk (BOS, tokens, EOS and padding), the chunks encoded apart and concatenated, pooled from the first."""

    def __init__(self, text_encoder):
        from transformers import CLIPTokenizer
        from memoguard.standalone.diffusers_model import BUNDLED_MODEL
        self.text_encoder = text_encoder
        self.tokenizer = _Tokenizer(CLIPTokenizer.from_pretrained(BUNDLED_MODEL / "tokenizer"))

    def tokenize(self, text, return_word_ids=False):
        tok = self.tokenizer.hf
        ids, word_ids = [], []
        for word_id, word in enumerate(text.split(), start=1):
            pieces = tok(word, add_special_tokens=False).input_ids
            ids += pieces
            word_ids += [word_id] * len(pieces)
        chunks = []
        for start in range(0, max(len(ids), 1), 75):
            part, words = ids[start:start + 75], word_ids[start:start + 75]
            pad = 75 - len(part)
            chunk_ids = [tok.bos_token_id] + part + [tok.eos_token_id] * (pad + 1)
            chunk_words = [0] + words + [0] * (pad + 1)
            chunks.append([(i, 1.0, w) if return_word_ids else (i, 1.0) for i, w in zip(chunk_ids, chunk_words)])
        return {"l": chunks}

    def encode_from_tokens_scheduled(self, tokens):
        with torch.no_grad():
            outs = [self.text_encoder(torch.tensor([[t[0] for t in chunk]])) for chunk in tokens["l"]]
        hidden = torch.cat([o.last_hidden_state for o in outs], dim=1)
        return [[hidden, {"pooled_output": outs[0].pooler_output}]]


class _Tokenizer:
    def __init__(self, hf):
        self.hf = hf

    def untokenize(self, pairs):
        return [(pair, self.hf.convert_ids_to_tokens(pair[0])) for pair in pairs]


# -- node definitions (what /object_info serves) --------------------------------------------------
# ComfyUI's core nodes used by the example workflows, as /object_info describes them (nodes.py);
# test_real_host checks these against the real server.
SAMPLERS = ["euler", "heun", "dpmpp_2m", "ddim"]
SCHEDULERS = ["simple", "normal", "karras", "exponential", "sgm_uniform", "ddim_uniform", "beta"]
CORE_NODES = {
    "CLIPTextEncode": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP", {}]},
    "EmptyLatentImage": {"width": ["INT", {}], "height": ["INT", {}], "batch_size": ["INT", {}]},
    "KSampler": {"model": ["MODEL", {}], "seed": ["INT", {"control_after_generate": True}], "steps": ["INT", {}],
                 "cfg": ["FLOAT", {}], "sampler_name": [SAMPLERS, {}], "scheduler": [SCHEDULERS, {}],
                 "positive": ["CONDITIONING", {}], "negative": ["CONDITIONING", {}],
                 "latent_image": ["LATENT", {}], "denoise": ["FLOAT", {}]},
    "VAEDecode": {"samples": ["LATENT", {}], "vae": ["VAE", {}]},
    "SaveImage": {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {}]},
}


def node_definitions() -> dict:
    """/object_info-style definitions of ComfyUI's core nodes above and of the pack's own nodes."""
    definitions = {name: {"input": {"required": spec}, "input_order": {"required": list(spec)}}
                   for name, spec in CORE_NODES.items()}
    for schema in _pack_schemas():
        required = {i.name: [i.io_type, i.options] for i in schema["inputs"] if not i.options.get("optional")}
        optional = {i.name: [i.io_type, i.options] for i in schema["inputs"] if i.options.get("optional")}
        definitions[schema["node_id"]] = {
            "input": {"required": required, "optional": optional},
            "input_order": {"required": list(required), "optional": list(optional)},
            "output": [o.io_type for o in schema["outputs"]],
            "output_name": [o.options.get("display_name") for o in schema["outputs"]]}
    return definitions


class NodeOutput:
    def __init__(self, *values, ui=None):
        self.args, self.ui = values, ui  # comfy_api.latest.io.NodeOutput: args, ui


@contextlib.contextmanager
def comfy_api_stand_in():
    """comfy_api.latest (io, ui) and comfy.samplers stand-ins while the pack's nodes_*.py are imported and run."""
    import sys
    import types

    class Slot:
        def __init__(self, io_type, name=None, **options):
            self.io_type, self.name, self.options = io_type, name, options

    class IOType:
        def __init__(self, io_type):
            self.io_type = io_type

        def Input(self, name, **options):
            return Slot(self.io_type, name, **options)

        def Output(self, **options):
            return Slot(self.io_type, **options)

    class PreviewImage:
        def __init__(self, image, cls=None):
            self.image = image

        def as_dict(self):
            return {"images": [tuple(self.image.shape)]}

    io = types.ModuleType("comfy_api.latest.io")
    for attr, io_type in {"Model": "MODEL", "Clip": "CLIP", "Vae": "VAE", "Latent": "LATENT", "Image": "IMAGE",
                          "Int": "INT", "Float": "FLOAT", "String": "STRING", "Boolean": "BOOLEAN",
                          "Combo": "COMBO", "Conditioning": "CONDITIONING", "AnyType": "*"}.items():
        setattr(io, attr, IOType(io_type))
    io.Schema = lambda **kwargs: kwargs
    io.ComfyNode, io.NodeOutput = object, NodeOutput
    io.Hidden = types.SimpleNamespace(unique_id="UNIQUE_ID")
    ui = types.ModuleType("comfy_api.latest.ui")
    ui.PreviewImage = PreviewImage
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ui = io, ui
    samplers = types.ModuleType("comfy.samplers")
    samplers.KSampler = types.SimpleNamespace(SAMPLERS=SAMPLERS, SCHEDULERS=SCHEDULERS)
    samplers.calculate_sigmas = lambda model_sampling, scheduler, steps: schedule(
        types.SimpleNamespace(model_sampling=model_sampling), steps)
    sample = types.ModuleType("comfy.sample")  # KSampler's noise: one CPU generator seeded per call
    sample.prepare_noise = lambda latent, seed: torch.randn(latent.shape, generator=torch.manual_seed(seed))
    sample.fix_empty_latent_channels = fix_empty_latent_channels_033
    management = types.ModuleType("comfy.model_management")
    management.load_models_gpu = lambda models: None
    management.processing_interrupted = lambda: False
    management.throw_exception_if_processing_interrupted = lambda: None
    utils = types.ModuleType("comfy.utils")  # ProgressBar: records what a node reports

    class ProgressBar:
        updates = []

        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None):
            ProgressBar.updates.append((value, total))

    utils.ProgressBar = ProgressBar
    comfy = types.ModuleType("comfy")
    comfy.samplers, comfy.sample, comfy.model_management, comfy.utils = samplers, sample, management, utils
    stand_ins = {"comfy_api": types.ModuleType("comfy_api"), "comfy_api.latest": latest, "comfy": comfy,
                 "comfy.samplers": samplers, "comfy.sample": sample, "comfy.model_management": management,
                 "comfy.utils": utils}
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for name in [m for m in sys.modules if m.startswith("nodes.nodes_")]:
            del sys.modules[name]  # they hold the stand-ins


PACK_NODE_MODULES = ("nodes_loader", "nodes_monitor", "nodes_mitigation", "nodes_tokens", "nodes_calibration",
                     "nodes_text_encode", "nodes_evidence", "nodes_training_filter")


def _pack_schemas():
    """The pack's V3 node schemas, built against a stand-in for comfy_api.latest (no ComfyUI in CI)."""
    import importlib
    with comfy_api_stand_in():
        modules = [importlib.import_module(f"nodes.{name}") for name in PACK_NODE_MODULES]
        return [obj.define_schema() for m in modules for obj in vars(m).values()
                if isinstance(obj, type) and obj.__module__ == m.__name__ and hasattr(obj, "define_schema")]
