"""Check a random SD1.5 checkpoint in a ComfyUI checkout: loads with CheckpointLoaderSimple, is detected as SD15,
the image depends on the prompt (two prompts, same seed, clearly different) and is not constant.

    /work/hosts/comfy-venv/bin/python tests/hosts/check_random_sd15.py /work/hosts/models/random-sd15.safetensors \
        [--comfyui-dir /work/hosts/ComfyUI] [--size 64] [--steps 4]
Prints one JSON line; exit status 1 when a check fails.
"""
import argparse
import json
import os
import sys


def first(result):
    return result[0] if isinstance(result, (tuple, list)) else result.result[0]  # V1 tuple or V3 NodeOutput


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--comfyui-dir", default=os.environ.get("COMFYUI_DIR", "/work/hosts/ComfyUI"))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    ckpt = os.path.abspath(a.checkpoint)
    sys.path.insert(0, a.comfyui_dir)
    os.chdir(a.comfyui_dir)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import utils.extra_config  # noqa: F401
    import torch
    import folder_paths
    import nodes
    import comfy.supported_models
    folder_paths.add_model_folder_path("checkpoints", os.path.dirname(ckpt))
    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(ckpt))[:3]
        family = type(model.model.model_config).__name__
        latent = first(nodes.EmptyLatentImage().generate(a.size, a.size, 1))
        negative = first(nodes.CLIPTextEncode().encode(clip, ""))
        images = {}
        for text in ("a purple ring, lighthouse poster", "a photograph of an astronaut riding a horse",
                     "a purple ring, lighthouse poster"):
            positive = first(nodes.CLIPTextEncode().encode(clip, text))
            out = first(nodes.common_ksampler(model, a.seed, a.steps, 7.0, "euler", "normal", positive, negative, latent))
            images.setdefault(text, []).append(first(nodes.VAEDecode().decode(vae, out)).float())
    (a1, a2), (b,) = images.values()
    result = {
        "checkpoint": ckpt, "model": family, "image_shape": list(a1.shape),
        "mean_abs_diff_two_prompts": float((a1 - b).abs().mean()),
        "mean_abs_diff_same_prompt": float((a1 - a2).abs().mean()),
        "pixel_std": [float(a1.std()), float(b.std())],
        "pixel_mean": [float(a1.mean()), float(b.mean())],
        "saturated_share": float(((a1 <= 0) | (a1 >= 1)).float().mean()),
    }
    problems = []
    if family != "SD15":
        problems.append(f"detected as {family}, not SD15")
    if result["mean_abs_diff_two_prompts"] < 0.02:
        problems.append("two prompts give (nearly) the same image: the UNet ignores the prompt")
    if min(result["pixel_std"]) < 0.01:
        problems.append("constant image")
    if result["mean_abs_diff_same_prompt"] > 1e-6:
        problems.append("same prompt and seed give different images")
    result["problems"] = problems
    print(json.dumps(result))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
