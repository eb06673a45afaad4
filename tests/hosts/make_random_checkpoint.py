"""A random-weight SD1.5 (fp16 .safetensors, ~2 GB) or SDXL (~7 GB) checkpoint in the single-file layout every host
detects, built with ComfyUI's own classes.

Run with a ComfyUI venv (setup_comfyui.sh) from anywhere; the ComfyUI checkout is --comfyui-dir, else
$COMFYUI_DIR, else the one that goes with the running venv (comfy-venv -> /work/hosts/ComfyUI, comfy033-venv ->
/work/hosts/ComfyUI-033), else whichever of those two exists:
    /work/hosts/comfy-venv/bin/python    tests/hosts/make_random_checkpoint.py --out /work/hosts/models/random-sd15.safetensors --seed 0
    /work/hosts/comfy-venv/bin/python    tests/hosts/make_random_checkpoint.py --family sdxl --out /work/hosts/models/random-sdxl.safetensors
(SDXL: about 14 GB of RAM while it is built in fp32.)

supported_models.SD15 (model_channels 320, context 768) with its CLIP-L, or supported_models.SDXL (context 2048,
adm 2816) with CLIP-L and CLIP-G, each as model_detection writes its config for the real checkpoints, + the SD
AutoencoderKL (SDXL's has the same shape). comfy.ops skips init and LDM zero-initialises output projections (a UNet
that then ignores the prompt) - so every conv/linear weight is drawn here: normal(0, 1/sqrt(fan_in)),
biases normal(0, 0.02), norm weights 1 / biases normal(0, 0.02), embeddings normal(0, 0.02). The UNet's
final conv is then scaled so eps has std ~1, the VAE decoder's final conv so pixels have std ~0.5 before
clamping (images neither constant nor saturated). Saved with comfy.sd.save_checkpoint.
"""
import argparse
import math
import os
import sys


HOSTS = "/work/hosts"
# the full openaimodel configs model_detection writes for SD1.5, SD2 (v) and SDXL base checkpoints, and the
# supported_models class each is detected as
UNET_CONFIGS = {
    "sd15": {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
             'legacy': False, 'adm_in_channels': None, 'in_channels': 4, 'model_channels': 320,
             'num_res_blocks': [2, 2, 2, 2], 'transformer_depth': [1, 1, 1, 1, 1, 1, 0, 0],
             'channel_mult': [1, 2, 4, 4], 'transformer_depth_middle': 1, 'use_linear_in_transformer': False,
             'context_dim': 768, 'num_heads': 8, 'transformer_depth_output': [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             'use_temporal_attention': False, 'use_temporal_resblock': False},
    "sd2": {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
            'legacy': False, 'adm_in_channels': None, 'in_channels': 4, 'model_channels': 320,
            'num_res_blocks': [2, 2, 2, 2], 'transformer_depth': [1, 1, 1, 1, 1, 1, 0, 0], 'channel_mult': [1, 2, 4, 4],
            'transformer_depth_middle': 1, 'use_linear_in_transformer': True, 'context_dim': 1024,
            'num_head_channels': 64, 'transformer_depth_output': [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            'use_temporal_attention': False, 'use_temporal_resblock': False},
    "sdxl": {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
             'legacy': False, 'num_classes': 'sequential', 'adm_in_channels': 2816, 'in_channels': 4,
             'model_channels': 320, 'num_res_blocks': [2, 2, 2], 'transformer_depth': [0, 0, 2, 2, 10, 10],
             'channel_mult': [1, 2, 4], 'transformer_depth_middle': 10, 'use_linear_in_transformer': True,
             'context_dim': 2048, 'num_head_channels': 64, 'transformer_depth_output': [0, 0, 0, 2, 2, 2, 10, 10, 10],
             'use_temporal_attention': False, 'use_temporal_resblock': False},
}
DETECTED_AS = {"sd15": "SD15", "sd2": "SD20", "sdxl": "SDXL"}
VAE_CONFIG = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
              'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}
VENV_TO_CHECKOUT = {"comfy-venv": "ComfyUI", "comfy033-venv": "ComfyUI-033"}  # tests/hosts/README.md layout


def default_comfyui_dir():
    if os.environ.get("COMFYUI_DIR"):
        return os.environ["COMFYUI_DIR"]
    paired = VENV_TO_CHECKOUT.get(os.path.basename(os.path.normpath(sys.prefix)))
    candidates = ([os.path.join(HOSTS, paired)] if paired else []) + [os.path.join(HOSTS, d) for d in VENV_TO_CHECKOUT.values()]
    return next((d for d in candidates if os.path.isfile(os.path.join(d, "comfy", "sd.py"))), None)


def comfy_imports(comfy_dir):
    if not comfy_dir or not os.path.isfile(os.path.join(comfy_dir, "comfy", "sd.py")):
        raise SystemExit(
            f"no ComfyUI checkout at {comfy_dir or ' or '.join(os.path.join(HOSTS, d) for d in VENV_TO_CHECKOUT.values())}: "
            "this script builds the checkpoint with ComfyUI's classes. Make one (tests/hosts/README.md, ComfyUI section: "
            "checkout_comfyui.sh + setup_comfyui.sh) and run this with its venv's python, passing --comfyui-dir DIR "
            "(or COMFYUI_DIR=DIR) if it is elsewhere.")
    sys.path.insert(0, comfy_dir)
    os.chdir(comfy_dir)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import utils.extra_config  # noqa: F401  (before nodes/server, as main.py does)
    import comfy.model_management  # noqa: F401
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.model_detection
    return comfy


def init_module(module, torch, generator):
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    for m in module.modules():
        own = dict(m.named_parameters(recurse=False))
        if not own:
            continue
        if isinstance(m, torch.nn.Embedding):
            for p in own.values():
                p.data.normal_(0, 0.02, generator=generator)
        elif isinstance(m, norms) or type(m).__name__.endswith("Norm"):
            for name, p in own.items():
                if name == "weight":
                    p.data.fill_(1.0)
                else:
                    p.data.normal_(0, 0.02, generator=generator)
        else:
            for name, p in own.items():
                if p.dim() >= 2:
                    fan_in = p[0].numel()
                    p.data.normal_(0, 1 / math.sqrt(fan_in), generator=generator)
                elif p.numel() == 1 and "scale" in name:
                    pass  # e.g. logit_scale: keep the constructor's value
                else:
                    p.data.normal_(0, 0.02, generator=generator)
    for name, p in module.named_parameters():
        if p.numel() > 1 and not p.detach().float().abs().gt(0).any():
            raise RuntimeError(f"all-zero parameter after init: {name}")


def build_random(comfy, family, torch, generator, weight_dtype, compute_dtype=None):
    """(model config, BaseModel, its ModelPatcher, CLIP, AutoencoderKL) of `family` with ComfyUI's classes on the CPU,
    every weight drawn by init_module."""
    config = comfy.model_detection.model_config_from_unet_config(dict(UNET_CONFIGS[family]))
    assert type(config) is getattr(comfy.supported_models, DETECTED_AS[family]), type(config)
    config.set_inference_dtype(weight_dtype, compute_dtype)
    cpu = torch.device("cpu")
    base = config.get_model({}, device=cpu)
    init_module(base.diffusion_model, torch, generator)
    model = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
    clip = comfy.sd.CLIP(config.clip_target(), model_options={"dtype": torch.float32, "load_device": cpu,
                                                               "offload_device": cpu, "initial_device": cpu})
    init_module(clip.cond_stage_model, torch, generator)
    from comfy.ldm.models.autoencoder import AutoencoderKL
    ae = AutoencoderKL(ddconfig=VAE_CONFIG, embed_dim=4)
    init_module(ae, torch, generator)
    return config, base, model, clip, ae


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    ap.add_argument("--comfyui-dir", default=None,
                    help="ComfyUI checkout (default: $COMFYUI_DIR, else the /work/hosts checkout matching this venv)")
    a = ap.parse_args()
    a.comfyui_dir = os.path.abspath(a.comfyui_dir) if a.comfyui_dir else default_comfyui_dir()
    out = os.path.abspath(a.out)
    comfy = comfy_imports(a.comfyui_dir)
    import torch
    g = torch.Generator().manual_seed(a.seed)
    torch.manual_seed(a.seed)

    config, base, model, clip, ae = build_random(comfy, a.family, torch, g, torch.float32)

    with torch.inference_mode(False), torch.no_grad():
        # scale the UNet's last conv: eps std ~1 on a noisy latent with a real prompt's conditioning
        tokens = clip.tokenize("a photograph of an astronaut riding a horse")
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        x = torch.randn(1, 4, 8, 8, generator=g)
        t = torch.tensor([500.0])
        y = base.encode_adm(pooled_output=pooled.float(), width=64, height=64) if a.family == "sdxl" else None
        eps = base.diffusion_model(x, t, context=cond.float(), y=y)
        conv = base.diffusion_model.out[-1]
        s = 1.0 / float(eps.std())
        conv.weight.data.mul_(s)
        conv.bias.data.mul_(s)
        ae_out = ae.decode(torch.randn(1, 4, 8, 8, generator=g))
        s2 = 0.5 / float(ae_out.std())
        ae.decoder.conv_out.weight.data.mul_(s2)
        ae.decoder.conv_out.bias.data.mul_(s2)
        print(f"unet eps std {float(eps.std()):.3g} -> scaled x{s:.3g}; vae out std {float(ae_out.std()):.3g} -> x{s2:.3g}")

        base.diffusion_model.half()
        clip.cond_stage_model.half()
        ae.half()
        vae = comfy.sd.VAE(sd=ae.state_dict())
        vae.first_stage_model.half()  # VAE() loads into its own working dtype (fp32 on CPU)
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        comfy.sd.save_checkpoint(out, model, clip=clip, vae=vae,
                                 metadata={"memoguard": f"random {a.family}, seed {a.seed}, "
                                                        "tests/hosts/make_random_checkpoint.py"})
    os.chmod(out, 0o644)
    import safetensors
    with safetensors.safe_open(out, "pt") as f:
        keys = list(f.keys())
        dtypes = {str(f.get_slice(k).get_dtype()) for k in keys}
        zero = [k for k in keys if f.get_tensor(k).numel() > 1 and not f.get_tensor(k).float().abs().gt(0).any()]
    prefixes = sorted({k.split(".")[0] + "." + k.split(".")[1] for k in keys})
    print(f"saved {out}: {os.path.getsize(out) / 2**30:.2f} GiB, {len(keys)} tensors, dtypes {dtypes}, prefixes {prefixes}")
    if zero:
        raise SystemExit(f"all-zero tensors in the file: {zero[:10]}")


if __name__ == "__main__":
    main()
