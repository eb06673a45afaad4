"""Single-file Stable Diffusion checkpoints for the standalone path, fully offline.

ComfyUI and WebUI users keep models as one `.safetensors` or `.ckpt` file in the original LDM/SGM key
layout (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*` / `conditioner.*`).
`checkpoint_parts` turns such a file into the components a diffusers folder holds (built into the same
`DiffusersModel` by memoguard.standalone.diffusers_model), with no hub access: the diffusers/transformers
configs of each family ship in `memoguard/assets/configs/<family>/` (written from the architectures' published hyper-parameters), the tokenizers reuse CLIP's BPE files of the
bundled model, and the weights go through diffusers' own LDM->diffusers converters component by component
(UNet, VAE) and through the CLIP / OpenCLIP key maps below (text encoders), each loaded strictly: a weight
the architecture needs and the file lacks is an error, never a silent random init.

Family, from the state-dict keys:
    SD1.x  cond_stage_model.transformer.*   (CLIP ViT-L/14, 512 px)
    SD2.x  cond_stage_model.model.*         (OpenCLIP ViT-H/14, 768 px v / 512 px eps)
    SDXL   conditioner.embedders.0.transformer.* + conditioner.embedders.1.model.*  (CLIP-L + OpenCLIP bigG, 1024 px)
Anything else (SD3, Flux, an SDXL refiner, a bare UNet, a LoRA, a VAE ...) is refused with a ModelLoadError
that says what the file looks like.

Prediction type (`prediction="auto" | "eps" | "v"`). "eps" / "v" are taken as given. "auto" uses, first
match wins: a `v_pred` key in the state dict (ComfyUI's marker); the safetensors metadata
`modelspec.prediction_type` or kohya's `ss_v_parameterization`; an A1111-style sidecar `<name>.yaml` next to
the file (`parameterization: "v"` -> v, otherwise eps); for SD2 a `.ckpt` whose `global_step` is 875000
(SD 2.0/2.1-base -> eps, the rule diffusers uses); for SD2 otherwise ComfyUI's weight test (the std of
`output_blocks.11.1.transformer_blocks.0.norm1.bias` > 0.09 -> v), printed on stderr because it is a
heuristic. SD1 and SDXL default to eps. SD2 models get the 768-v / 512-base convention: a v model is scored
at 96x96 latents (768 px), an eps model at 64x64 (512 px). A `ztsnr` key (ComfyUI's marker) switches the
schedule to zero terminal SNR; EDM models (Playground v2.5's `edm_mean`, `edm_vpred.*`) are refused.

Non-standard architectures (other sizes, the bundled pixel-space tiny model) load with `config=FOLDER`: a
diffusers-layout folder with model_index.json and unet/, text_encoder/ (text_encoder_2/), scheduler/, vae/
configs (weights there are ignored; a `vae: [null, null]` entry means pixel space; a tokenizer folder
without vocab.json/merges.txt uses CLIP's bundled BPE). The family's key layout still decides how the text
encoders are read; the prediction type then comes from that folder's scheduler unless eps/v is given.
"""
import json
import pickle
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..errors import ModelLoadError
from ..resources import asset_path

CONFIGS = asset_path("configs")
BPE_TOKENIZER = asset_path("tiny-sd", "tokenizer")
PREDICTIONS = ("auto", "eps", "v")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
# each family's text encoders: (config subfolder, tokenizer subfolder, key prefix, layout)
TEXT_ENCODERS = {
    "sd1": [("text_encoder", "tokenizer", "cond_stage_model.transformer.", "clip")],
    "sd2": [("text_encoder", "tokenizer", "cond_stage_model.model.", "openclip")],
    "sdxl": [("text_encoder", "tokenizer", "conditioner.embedders.0.transformer.", "clip"),
             ("text_encoder_2", "tokenizer_2", "conditioner.embedders.1.model.", "openclip")],
}
SD2_V_TEST_KEY = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
# globals of training state in Lightning .ckpt files (callbacks, hyper-parameters): unpickled as inert stubs
TRAINING_STATE_MODULES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.", "numpy.")


def _error(message: str):
    return ModelLoadError(message)


# -- reading the file ------------------------------------------------------------------------------
class _KeyView(Mapping):
    """A read-only state dict over `keys` that fetches a tensor with `get` only when asked for it."""

    def __init__(self, keys, get):
        self._keys, self._get = list(keys), get
        self._set = set(self._keys)

    def __getitem__(self, key):
        if key not in self._set:
            raise KeyError(key)
        return self._get(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def __contains__(self, key):
        return key in self._set


def _safetensors_dict(handle, keys) -> _KeyView:
    """A state dict over a safetensors file that reads a tensor only when asked for it."""
    return _KeyView(keys, handle.get_tensor)


def _subset(sd, prefixes) -> _KeyView:
    """The entries of a state dict whose keys start with one of `prefixes` (lazy, no copy)."""
    return _KeyView([k for k in sd.keys() if k.startswith(prefixes)], sd.__getitem__)


class _Inert:
    """Stands in for a training-state class of a Lightning checkpoint; holds nothing, runs nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def read_checkpoint(path: Path) -> Tuple[Mapping, dict]:
    """(state dict, info) of a .safetensors or torch-pickle checkpoint; info has 'metadata' and 'global_step'.

    The format is sniffed from the content, not the suffix. Safetensors tensors are read lazily."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise _error(f"{path}: cannot read the file: {e.strerror or e}") from None
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return _read_torch(path)
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if len(head) < 10 or head[8:9] != b"{" or header_len + 8 > size:
        raise _error(f"{path.name} is not a model checkpoint (neither safetensors nor a torch .ckpt) or it is truncated")
    try:
        from safetensors import safe_open
        handle = safe_open(str(path), framework="pt", device="cpu")
        keys = list(handle.keys())
        metadata = dict(handle.metadata() or {})
    except Exception as e:  # SafetensorError for a bad header, offsets past the end, ...
        raise _error(f"{path.name} is a corrupt safetensors file: {e}") from None
    if not keys:
        raise _error(f"{path.name} holds no tensors: not a model checkpoint")
    return _safetensors_dict(handle, keys), {"metadata": metadata, "global_step": None}


def _read_torch(path: Path) -> Tuple[Mapping, dict]:
    """A torch.save()d checkpoint, unpickled with torch.load(weights_only=True): code in it never runs."""
    def load():
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format

    try:
        try:
            obj = load()
        except pickle.UnpicklingError as e:
            names = _unsafe_globals(path)
            if not names or not all(n.startswith(TRAINING_STATE_MODULES) for n in names):
                shown = ", ".join(names[:3]) if names else str(e).strip().splitlines()[0][:200]
                raise _error(f"{path.name}: torch.load(weights_only=True) refuses this .ckpt (it pickles {shown}); "
                             f"convert it to .safetensors") from None
            stubs = [(type(n.rsplit(".", 1)[-1], (_Inert,), {}), n) for n in names]
            with torch.serialization.safe_globals(stubs):
                obj = load()
    except Exception as e:
        if isinstance(e, ModelLoadError):
            raise
        raise _error(f"{path.name} is not a readable torch checkpoint (corrupt or truncated?): "
                     f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}") from None
    global_step = None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        if isinstance(obj.get("global_step"), int):
            global_step = obj["global_step"]
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise _error(f"{path.name} holds a {type(obj).__name__}, not a state dict: not a model checkpoint")
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not sd:
        raise _error(f"{path.name} holds no tensors: not a model checkpoint")
    return sd, {"metadata": {}, "global_step": global_step}


def _unsafe_globals(path):
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # torch < 2.5, or a legacy-format file
        return []


# -- what is it ------------------------------------------------------------------------------------
def _has(keys, prefix):
    return any(k.startswith(prefix) for k in keys)


def detect_family(keys) -> str:
    """'sd1', 'sd2' or 'sdxl' from the state-dict keys; a ModelLoadError saying what it is otherwise."""
    keys = list(keys)
    text = None
    if _has(keys, "conditioner.embedders.1.model.") and _has(keys, "conditioner.embedders.0.transformer."):
        text = "sdxl"
    elif _has(keys, "cond_stage_model.model."):
        text = "sd2"
    elif _has(keys, "cond_stage_model.transformer."):
        text = "sd1"
    if text and _has(keys, UNET_PREFIX + "input_blocks."):
        return text
    raise _error(f"unknown model family: {_describe(keys, text)}; the single-file loader reads SD1.x "
                 f"(cond_stage_model.transformer.*), SD2.x (cond_stage_model.model.*) and SDXL "
                 f"(conditioner.embedders.1.*) checkpoints")


def _describe(keys, text):
    stripped = [k[len(UNET_PREFIX):] if k.startswith(UNET_PREFIX) else k for k in keys]
    if text:
        return f"{FAMILY_NAMES[text]} text encoder keys but no UNet (model.diffusion_model.input_blocks.*)"
    if _has(stripped, "joint_blocks."):
        return "looks like SD3 / SD3.5 (MMDiT joint_blocks.*)"
    if _has(stripped, "double_blocks.") or _has(stripped, "single_blocks."):
        return "looks like Flux (double_blocks.* / single_blocks.*)"
    if _has(keys, "conditioner.embedders.0.model."):
        return "looks like the SDXL refiner (OpenCLIP bigG only), which has no CLIP-L prompt encoder"
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k or "lora_down" in k for k in keys):
        return "looks like a LoRA, not a full model"
    if _has(stripped, "input_blocks.") or _has(stripped, "down_blocks.") or _has(keys, "transformer_blocks."):
        return "looks like a bare UNet / transformer with no text encoder (load the full checkpoint)"
    if _has(stripped, "encoder.down.") or _has(stripped, "decoder.up_blocks.") or _has(stripped, "decoder.up."):
        return "looks like a VAE alone"
    shown = ", ".join(sorted(keys)[:3])
    return f"no known key layout (first keys: {shown})"


def _sidecar_prediction(path: Path) -> Optional[Tuple[str, str]]:
    for yaml_path in (path.with_suffix(".yaml"), path.with_suffix(".yml")):
        if yaml_path.is_file():
            try:
                text = yaml_path.read_text(errors="replace")
            except OSError:
                continue
            m = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", text, re.M)
            kind = "v" if m and m.group(1).lower() in ("v", "v_prediction") else "eps"
            return kind, f"{yaml_path.name} (parameterization: {m.group(1) if m else 'not set, the LDM default eps'})"
    return None


def resolve_prediction(family: str, requested: str, sd: Mapping, info: dict, path: Path) -> Tuple[str, str]:
    """('eps' | 'v', why) for a checkpoint; see the module docstring for the order of the rules."""
    if requested not in PREDICTIONS:
        raise _error(f"prediction must be one of {', '.join(PREDICTIONS)}, got {requested!r}")
    if requested != "auto":
        return requested, "given"
    if "v_pred" in sd:
        return "v", "the checkpoint's v_pred key"
    meta = info.get("metadata") or {}
    declared = str(meta.get("modelspec.prediction_type", "")).strip().lower()
    if declared in ("v", "v_prediction", "v-prediction"):
        return "v", f"metadata modelspec.prediction_type={declared}"
    if declared in ("eps", "epsilon"):
        return "eps", f"metadata modelspec.prediction_type={declared}"
    kohya = str(meta.get("ss_v_parameterization", "")).strip().lower()
    if kohya in ("true", "false"):
        return ("v" if kohya == "true" else "eps"), f"metadata ss_v_parameterization={kohya}"
    sidecar = _sidecar_prediction(path)
    if sidecar:
        return sidecar
    if family != "sd2":
        return "eps", f"{FAMILY_NAMES[family]} default"
    if info.get("global_step") == 875000:
        return "eps", "global_step 875000 (SD 2.x-base)"
    if SD2_V_TEST_KEY in sd:
        std = float(sd[SD2_V_TEST_KEY].float().std(unbiased=False))
        kind = "v" if std > 0.09 else "eps"
        sys.stderr.write(f"memoguard: {path.name}: SD2.x prediction type guessed as {kind} from its weights "
                         f"(ComfyUI's norm1.bias std test: {std:.3f} vs 0.09); pass --prediction eps|v if wrong\n")
        return kind, f"weight test (norm1.bias std {std:.3f} vs 0.09)"
    return "v", "SD2.x default (768-v)"


# -- building the components -----------------------------------------------------------------------
def _load_strict(module, state: dict, what: str, path: Path, arch: str):
    """Assign `state` to a module built on the meta device; every parameter must come from the file.

    `arch` names the config it was built from ("the SD1.x config" or "config FOLDER")."""
    advice = "; for a non-standard architecture pass config=FOLDER" if arch.startswith("the ") else ""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise _error(f"{path.name}: the {what} does not fit {arch} ({len(missing)} weights missing, "
                     f"e.g. {missing[0]}){advice}")
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        k, got, want = wrong[0]
        raise _error(f"{path.name}: the {what} does not fit {arch} ({len(wrong)} shape mismatches, e.g. {k}: "
                     f"{got} in the file, {want} expected){advice}")
    module.load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)
    for name, buf in list(module.named_buffers()):  # non-persistent buffers are not in the file
        if buf.is_meta:
            if not name.endswith("position_ids"):
                raise _error(f"{path.name}: cannot materialise the {what} buffer {name}")
            owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            owner.register_buffer(name.rsplit(".", 1)[-1], torch.arange(buf.shape[-1]).expand(buf.shape),
                                  persistent=False)
    return module


def _clip_state(sd: Mapping, prefix: str) -> dict:
    """HF CLIPTextModel keys stored under `prefix` (SD1's cond_stage_model.transformer., SDXL's embedder 0)."""
    out = {}
    for key in sd.keys():
        if key.startswith(prefix):
            name = key[len(prefix):]
            name = name[len("text_model."):] if name.startswith("text_model.") else name
            if not name.endswith("position_ids"):
                out[name] = sd[key]
    return out


def _openclip_state(sd: Mapping, prefix: str, layers: int) -> dict:
    """OpenCLIP text-tower keys -> HF CLIPTextModel keys (without 'text_model.'), the first `layers` blocks."""
    out = {}
    simple = {"token_embedding.weight": "embeddings.token_embedding.weight",
              "positional_embedding": "embeddings.position_embedding.weight",
              "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
    parts = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2.",
             "attn.out_proj.": "self_attn.out_proj."}
    for key in sd.keys():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name in simple:
            out[simple[name]] = sd[key]
        elif name == "text_projection":
            out["@text_projection.weight"] = sd[key].T.contiguous()  # '@': outside text_model
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", name)
        if not m or int(m.group(1)) >= layers:
            continue
        base, rest = f"encoder.layers.{m.group(1)}.", m.group(2)
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            q, k, v = sd[key].chunk(3, dim=0)
            kind = "weight" if rest.endswith("weight") else "bias"
            for proj, t in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{base}self_attn.{proj}.{kind}"] = t.contiguous()
            continue
        for old, new in parts.items():
            if rest.startswith(old):
                out[base + new + rest[len(old):]] = sd[key]
                break
    return out


def _text_encoder(cls, config_dir: Path, sd: Mapping, prefix: str, layout: str, dtype, path: Path, arch: str):
    from transformers import CLIPTextConfig
    config = CLIPTextConfig.from_pretrained(str(config_dir), local_files_only=True)
    with torch.device("meta"):
        model = cls(config)
    flat = (_clip_state(sd, prefix) if layout == "clip"
            else _openclip_state(sd, prefix, config.num_hidden_layers))
    inner = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
    state = {(k[1:] if k.startswith("@") else inner + k): v for k, v in flat.items()}
    _load_strict(model, state, f"text encoder ({config_dir.name})", path, arch)
    return model.to(dtype).eval()


def _tokenizer(folder: Path):
    from transformers import CLIPTokenizer
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    overrides = {}
    cfg_file = folder / "tokenizer_config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = cfg.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                overrides[key] = value
        if isinstance(cfg.get("model_max_length"), int):
            overrides["model_max_length"] = cfg["model_max_length"]
    return CLIPTokenizer.from_pretrained(str(BPE_TOKENIZER), local_files_only=True, **overrides)


def _component_present(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and bool(entry) and entry[0] is not None


@dataclass
class CheckpointParts:
    """What a single file holds, as diffusers / transformers components (memoguard.standalone.diffusers_model's
    build_model turns them into a model, as it does a folder's)."""
    components: tuple            # (unet, text encoders, tokenizers, scheduler, vae or None)
    family: str
    prediction_source: str       # why the prediction type is what it is
    notes_dir: Optional[Path]    # a config folder given by the user


def checkpoint_parts(path, dtype=torch.float32, prediction: str = "auto", config=None) -> CheckpointParts:
    """A single-file SD1.x / SD2.x / SDXL checkpoint (or any architecture, given `config`) as its components."""
    try:
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
        from transformers import CLIPTextModel, CLIPTextModelWithProjection
    except ImportError as e:
        raise ModelLoadError(f"loading a single-file checkpoint needs diffusers and transformers "
                             f"(pip install -e '.[standalone]'): {e}") from None
    path = Path(path)
    if prediction not in PREDICTIONS:
        raise ModelLoadError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
    if config is not None:
        config_dir = Path(config)
        if not (config_dir / "model_index.json").is_file():
            raise ModelLoadError(f"config {config_dir} is not a diffusers config folder (no model_index.json)")
    sd, info = read_checkpoint(path)
    family = detect_family(sd.keys())
    edm = [k for k in ("edm_mean", "edm_vpred.sigma_max") if k in sd]
    if edm:
        raise ModelLoadError(f"{path.name} is an EDM-parameterised model ({edm[0]}: Playground v2.5 or an EDM "
                             f"v-prediction fine-tune); MemoGuard scores DDPM-schedule SD models only")
    config_dir = Path(config) if config is not None else CONFIGS / family
    arch = f"config {config_dir}" if config is not None else f"the {FAMILY_NAMES[family]} config"
    try:
        index = json.loads((config_dir / "model_index.json").read_text())
        unet_config = dict(UNet2DConditionModel.load_config(str(config_dir / "unet"), local_files_only=True))
        scheduler = DDIMScheduler.from_pretrained(str(config_dir / "scheduler"), local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"config {config_dir} is unreadable: {type(e).__name__}: {e}") from None
    if config is None:
        kind, why = resolve_prediction(family, prediction, sd, info, path)
    elif prediction != "auto":
        kind, why = prediction, "given"
    else:
        kind = "v" if scheduler.config.get("prediction_type") == "v_prediction" else "eps"
        why = f"{config_dir.name}/scheduler"
    wanted = "v_prediction" if kind == "v" else "epsilon"
    if scheduler.config.get("prediction_type") != wanted:
        scheduler = DDIMScheduler.from_config(scheduler.config, prediction_type=wanted)
    if config is None and "ztsnr" in sd:  # ComfyUI's marker of a zero-terminal-SNR schedule (some v fine-tunes)
        scheduler = DDIMScheduler.from_config(scheduler.config, rescale_betas_zero_snr=True)

    conv_in = sd.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if (conv_in is not None and conv_in.ndim == 4 and conv_in.shape[1] in (8, 9)
            and conv_in.shape[1] != unet_config["in_channels"]):
        what = "an inpainting" if conv_in.shape[1] == 9 else "an instruct-pix2pix"
        raise ModelLoadError(f"{path.name} is {what} model ({conv_in.shape[1]} UNet input channels); MemoGuard "
                             f"scores text-to-image models ({unet_config['in_channels']} channels)")
    if config is None:
        proj_in = sd.get(UNET_PREFIX + "input_blocks.1.1.proj_in.weight")
        if proj_in is not None:  # some SD1 fine-tunes were saved with linear, some SD2 ones with conv projections
            unet_config["use_linear_projection"] = proj_in.ndim == 2
        if family == "sd2":
            unet_config["sample_size"] = 96 if kind == "v" else 64  # 768-v / 512-base

    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_config)
        unet_state = convert_ldm_unet_checkpoint(checkpoint=_subset(sd, (UNET_PREFIX,)), config=unet_config)
        unet = _load_strict(unet, unet_state, "UNet", path, arch).to(dtype)
        del unet_state
        vae = None
        if _component_present(index, "vae"):
            if not _has(sd.keys(), VAE_PREFIX):
                raise ModelLoadError(f"{path.name} has no VAE weights (first_stage_model.*); MemoGuard needs a "
                                     f"checkpoint with its VAE baked in")
            vae_config = dict(AutoencoderKL.load_config(str(config_dir / "vae"), local_files_only=True))
            with torch.device("meta"):
                vae = AutoencoderKL.from_config(vae_config)
            vae_state = convert_ldm_vae_checkpoint(checkpoint=_subset(sd, (VAE_PREFIX,)), config=vae_config)
            vae = _load_strict(vae, vae_state, "VAE", path, arch).to(dtype)
            del vae_state
        encoders, tokenizers = [], []
        specs = TEXT_ENCODERS[family]
        if not _component_present(index, "text_encoder_2"):
            specs = specs[:1]
        elif len(specs) < 2:
            raise ModelLoadError(f"{path.name}: config {config_dir} wants two text encoders, the file has one")
        for i, (sub, tok_sub, prefix, layout) in enumerate(specs):
            cls = CLIPTextModelWithProjection if i == 1 else CLIPTextModel
            encoders.append(_text_encoder(cls, config_dir / sub, sd, prefix, layout, dtype, path, arch))
            tokenizers.append(_tokenizer(config_dir / tok_sub))
    except ModelLoadError:
        raise
    except Exception as e:  # a converter or constructor tripping over an unexpected file
        raise ModelLoadError(f"could not load {path.name} as {FAMILY_NAMES[family]}: {type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}") from None
    del sd
    return CheckpointParts((unet, encoders, tokenizers, scheduler, vae), family, why,
                           config_dir if config is not None else None)
