"""Single-file checkpoints (memoguard.standalone.checkpoints): the bundled tiny model written in the original LDM key
layout loads to the same model as its diffusers folder; family / prediction detection; clear errors."""
import json
import re
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from memoguard.standalone.checkpoints import CONFIGS, detect_family, resolve_prediction
from memoguard.errors import ModelLoadError
from memoguard.standalone.diffusers_model import BUNDLED_MODEL, load_model
from memoguard.sampling import initial_noise

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
TOP = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
       "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}


def _resnet(rest):
    for new, old in RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    raise KeyError(rest)


def unet_to_ldm(state, config):
    """diffusers UNet2DConditionModel keys -> LDM openaimodel keys (what an SD-style UNet like the tiny one uses)."""
    per = config["layers_per_block"] + 1
    attn_up = {i for i, t in enumerate(config["up_block_types"]) if t.startswith("CrossAttn")}
    out = {}
    for key, value in state.items():
        new = next((old + key[len(d):] for d, old in TOP.items() if key.startswith(d)), None)
        if new is None and (m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = 1 + b * per + j
            new = f"input_blocks.{idx}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
        elif new is None and (m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key)):
            new = f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
        elif new is None and (m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)):
            new = (f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}" if m[1] == "resnets"
                   else f"middle_block.1.{m[3]}")
        elif new is None and (m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = b * per + j
            new = f"output_blocks.{idx}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
        elif new is None and (m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key)):
            b = int(m[1])
            new = f"output_blocks.{b * per + per - 1}.{2 if b in attn_up else 1}.conv.{m[2]}"
        if new is None:
            raise KeyError(f"no LDM name for {key}")
        out["model.diffusion_model." + new] = value
    return out


def tiny_ldm_state():
    """The bundled model's weights as an original-layout SD1 checkpoint (with the extras real ones carry)."""
    from safetensors.torch import load_file
    unet = load_file(BUNDLED_MODEL / "unet" / "diffusion_pytorch_model.safetensors")
    config = json.loads((BUNDLED_MODEL / "unet" / "config.json").read_text())
    state = unet_to_ldm(unet, config)
    for key, value in load_file(BUNDLED_MODEL / "text_encoder" / "model.safetensors").items():
        key = key[len("text_model."):] if key.startswith("text_model.") else key
        state["cond_stage_model.transformer.text_model." + key] = value
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["alphas_cumprod"] = torch.linspace(0.999, 0.005, 1000)  # LDM's DDPM buffers and EMA bookkeeping
    state["model_ema.decay"] = torch.tensor(0.9999)
    return state


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-ldm.safetensors"
    save_file(tiny_ldm_state(), str(path))
    return path


@pytest.fixture(scope="module")
def folder_model():
    return load_model()


def first_step_eps(model, prompts=("a purple ring, lighthouse poster", "a red circle", "")):
    enc = model.encode(list(prompts))
    x = initial_noise(model, model.latent_shape(), list(range(len(prompts))), model.device)
    t = model.timesteps(20)[0]
    with torch.no_grad():
        return model.raw_prediction(x, t, enc.embedding, enc.extra), enc


def assert_same_model(single, folder):
    eps_file, enc_file = first_step_eps(single)
    eps_dir, enc_dir = first_step_eps(folder)
    assert (eps_file - eps_dir).abs().max().item() < 1e-6
    assert enc_file.tokens == enc_dir.tokens
    assert single.model_key == folder.model_key
    assert single.parameterization == folder.parameterization == "eps"
    assert single.latent_shape() == folder.latent_shape() and single.vae is None
    assert single.guidance == folder.guidance


def test_single_file_gives_the_folder_models_first_step_eps(tiny_file, folder_model):
    single = load_model(tiny_file, config=BUNDLED_MODEL)
    assert single.name == "tiny-ldm" and single.family == "sd1"
    assert_same_model(single, folder_model)


def test_lightning_ckpt_loads_with_weights_only(tmp_path, tiny_file, folder_model, monkeypatch):
    # a PyTorch-Lightning .ckpt pickles callback objects next to the weights: they become inert stubs
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.monitor, self.best_model_score = "val/loss", 0.1

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    path = tmp_path / "tiny-lightning.ckpt"
    torch.save({"state_dict": tiny_ldm_state(), "global_step": 470000, "epoch": 3,
                "callbacks": {ModelCheckpoint: ModelCheckpoint()}}, path)
    monkeypatch.delitem(sys.modules, module.__name__)  # loading must not need the class
    single = load_model(path, config=BUNDLED_MODEL)
    assert single.name == "tiny-lightning"
    assert_same_model(single, folder_model)


def test_ckpt_with_foreign_code_is_refused(tmp_path, monkeypatch):
    module = types.ModuleType("evil_pkg")

    class Payload:
        pass

    Payload.__module__, Payload.__qualname__ = "evil_pkg", "Payload"
    module.Payload = Payload
    monkeypatch.setitem(sys.modules, "evil_pkg", module)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "extra": Payload()}, path)
    with pytest.raises(ModelLoadError, match=r"refuses this \.ckpt \(it pickles evil_pkg\.Payload\); convert it to \.safetensors"):
        load_model(path)


def test_prediction_override_and_the_standard_config_mismatch(tiny_file):
    v = load_model(tiny_file, config=BUNDLED_MODEL, prediction="v")
    assert v.parameterization == "v" and v.prediction_source == "given"
    # without config= the file is read as a standard SD1.x model, which the tiny weights do not fit
    with pytest.raises(ModelLoadError, match=r"the UNet does not fit the SD1.x config .*weights missing.*pass config=FOLDER"):
        load_model(tiny_file)
    with pytest.raises(ModelLoadError, match="prediction must be one of auto, eps, v"):
        load_model(tiny_file, prediction="x0")


def test_clear_errors(tmp_path, tiny_file, monkeypatch):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a checkpoint at all, just some bytes")
    with pytest.raises(ModelLoadError, match=r"junk\.safetensors is not a model checkpoint"):
        load_model(junk)
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a model checkpoint"):
        load_model(text)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(tiny_file.read_bytes()[: tiny_file.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=r"cut\.safetensors is a corrupt safetensors file"):
        load_model(truncated)
    cut_ckpt = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1000)}}, cut_ckpt)
    cut_ckpt.write_bytes(cut_ckpt.read_bytes()[:300])
    with pytest.raises(ModelLoadError, match=r"cut\.ckpt is not a readable torch checkpoint"):
        load_model(cut_ckpt)
    for name, key, what in [("sd3", "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias", "SD3"),
                            ("flux", "double_blocks.0.img_attn.norm.key_norm.scale", "Flux"),
                            ("refiner", "conditioner.embedders.0.model.text_projection", "the SDXL refiner")]:
        f = tmp_path / f"{name}.safetensors"
        save_file({key: torch.zeros(2)}, str(f))
        with pytest.raises(ModelLoadError, match=f"unknown model family: looks like {what}"):
            load_model(f)
    with pytest.raises(ModelLoadError, match="config= is for single-file checkpoints"):
        load_model(BUNDLED_MODEL, config=BUNDLED_MODEL)
    for mod in ("diffusers", "diffusers.loaders.single_file_utils"):
        monkeypatch.setitem(sys.modules, mod, None)  # import diffusers -> ImportError
    with pytest.raises(ModelLoadError, match=r"needs diffusers and transformers: pip install -e '\.\[standalone\]'"):
        load_model(tiny_file, config=BUNDLED_MODEL)


def test_errors_are_one_line(tmp_path):
    junk = tmp_path / "x.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError) as info:
        load_model(junk)
    assert "\n" not in str(info.value)


SD1 = ["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
       "model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.conv_in.weight"]
SD2 = ["cond_stage_model.model.token_embedding.weight", "model.diffusion_model.input_blocks.0.0.weight"]
SDXL = ["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        "conditioner.embedders.1.model.positional_embedding", "model.diffusion_model.input_blocks.0.0.weight"]


def test_family_from_keys():
    assert detect_family(SD1) == "sd1" and detect_family(SD2) == "sd2" and detect_family(SDXL) == "sdxl"
    with pytest.raises(ModelLoadError, match="SD1.x text encoder keys but no UNet"):
        detect_family(SD1[:1])
    with pytest.raises(ModelLoadError, match="a LoRA"):
        detect_family(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"])


def test_prediction_rules(tmp_path):
    f = tmp_path / "m.safetensors"
    sd2 = {k: torch.zeros(1) for k in SD2}
    norm = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    none = {"metadata": {}, "global_step": None}
    assert resolve_prediction("sd1", "auto", {}, none, f) == ("eps", "SD1.x default")
    assert resolve_prediction("sdxl", "auto", {}, none, f)[0] == "eps"
    assert resolve_prediction("sdxl", "auto", {"v_pred": torch.zeros(0)}, none, f)[0] == "v"
    assert resolve_prediction("sd2", "eps", sd2, none, f) == ("eps", "given")
    assert resolve_prediction("sd2", "auto", sd2, {"metadata": {}, "global_step": 875000}, f)[0] == "eps"
    assert resolve_prediction("sd2", "auto", sd2, {"metadata": {"modelspec.prediction_type": "v"}}, f)[0] == "v"
    assert resolve_prediction("sd1", "auto", {}, {"metadata": {"ss_v_parameterization": "True"}}, f)[0] == "v"
    g = torch.Generator().manual_seed(0)
    assert resolve_prediction("sd2", "auto", {**sd2, norm: torch.randn(320, generator=g) * 0.2}, none, f)[0] == "v"
    assert resolve_prediction("sd2", "auto", {**sd2, norm: torch.randn(320, generator=g) * 0.01}, none, f)[0] == "eps"
    assert resolve_prediction("sd2", "auto", sd2, none, f)[0] == "v"  # no evidence: the 768-v convention
    (tmp_path / "m.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert resolve_prediction("sd1", "auto", {}, none, f) == ("v", 'm.yaml (parameterization: v)')
    (tmp_path / "m.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert resolve_prediction("sd2", "auto", sd2, none, f)[0] == "eps"


def test_shipped_configs_have_the_published_architectures():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def count(m):
        return sum(p.numel() for p in m.parameters())

    def unet(family):
        with torch.device("meta"):
            return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(CONFIGS / family / "unet")))

    def clip(family, sub, cls=CLIPTextModel):
        with torch.device("meta"):
            return cls(CLIPTextConfig.from_pretrained(str(CONFIGS / family / sub)))

    assert count(unet("sd1")) == 859_520_964 and count(clip("sd1", "text_encoder")) == 123_060_480
    assert count(unet("sd2")) == 865_910_724 and count(clip("sd2", "text_encoder")) == 340_387_840
    assert count(unet("sdxl")) == 2_567_463_684
    assert count(clip("sdxl", "text_encoder_2", CLIPTextModelWithProjection)) == 694_659_840
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(CONFIGS / "sdxl" / "vae")))
    assert count(vae) == 83_653_863 and vae.config.scaling_factor == 0.13025
    pads = {f"{f}/{t}": json.loads((CONFIGS / f / t / "tokenizer_config.json").read_text())["pad_token"]
            for f, t in [("sd1", "tokenizer"), ("sd2", "tokenizer"), ("sdxl", "tokenizer"), ("sdxl", "tokenizer_2")]}
    assert pads == {"sd1/tokenizer": "<|endoftext|>", "sd2/tokenizer": "!", "sdxl/tokenizer": "<|endoftext|>",
                    "sdxl/tokenizer_2": "!"}
