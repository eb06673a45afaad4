"""Outside CI: does memoguard's single-file loader read SD1 / SD2 / SDXL checkpoints exactly as ComfyUI does?

Step 1, in a ComfyUI venv: build a random-weight model with ComfyUI's own classes (as make_random_checkpoint.py),
save it with comfy.sd.save_checkpoint (the original LDM/SGM key layout, fp16) and record ComfyUI's text
conditioning of a prompt and its raw UNet output on a fixed latent and timestep (fp32 compute on the fp16
weights), plus ComfyUI's own prediction-type verdict for the file:
    /work/hosts/comfy-venv/bin/python tests/hosts/check_single_file.py make --family sd2 --out /tmp/sd2.safetensors
Step 2, in MemoGuard's venv: load the file with memoguard.standalone.diffusers_model.load_model and compare:
    .venv/bin/python tests/hosts/check_single_file.py compare --out /tmp/sd2.safetensors
(the reference goes to OUT + ".ref.pt"). Memory: SDXL needs ~8 GB in step 1 and ~14 GB in step 2 (~7 GB with --dtype float16).
"""
import argparse
import os
import resource
import sys
import time

PROMPT = "a photograph of an astronaut riding a horse"
T = 500
SIZE = 16  # latent side of the comparison (the UNet is resolution-agnostic)

def peak_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def make(a):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_random_checkpoint import build_random, comfy_imports
    out = os.path.abspath(a.out)
    comfy = comfy_imports(a.comfyui_dir)
    import torch
    g = torch.Generator().manual_seed(a.seed)
    # fp16 weights, fp32 compute (manual cast)
    config, base, model, clip, ae = build_random(comfy, a.family, torch, g, torch.float16, torch.float32)
    with torch.inference_mode(False), torch.no_grad():
        clip.cond_stage_model.half().float()  # the reference uses exactly the fp16 weights the file will hold
        tokens = clip.tokenize(PROMPT)
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        empty, empty_pooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
        x = torch.randn(1, 4, SIZE, SIZE, generator=g)
        t = torch.tensor([float(T)])
        kwargs = {}
        if a.family == "sdxl":
            kwargs["y"] = base.encode_adm(pooled_output=pooled, width=1024, height=1024)
        eps = base.diffusion_model(x, t, context=cond.float(), **kwargs)
        conv = base.diffusion_model.out[-1]  # eps std ~1, as make_random_checkpoint.py
        s = 1.0 / float(eps.std())
        conv.weight.data.mul_(s)
        conv.bias.data.mul_(s)
        eps = base.diffusion_model(x, t, context=cond.float(), **kwargs)
        clip.cond_stage_model.half()
        ae.half()
        vae = comfy.sd.VAE(sd=ae.state_dict())
        vae.first_stage_model.half()
        comfy.sd.save_checkpoint(out, model, clip=clip, vae=vae,
                                 metadata={"memoguard": f"random {a.family}, seed {a.seed}, tests/hosts/check_single_file.py"})
    import safetensors.torch
    sd = safetensors.torch.load_file(out)
    verdict = config.model_type(sd, "model.diffusion_model.").name if hasattr(config, "model_type") else "EPS"
    torch.save({"family": a.family, "prompt": PROMPT, "t": T, "x": x, "cond": cond.float(), "pooled": pooled,
                "empty": empty.float(), "eps": eps.float(), "comfy_model_type": verdict}, out + ".ref.pt")
    print(f"{a.family}: saved {out} ({os.path.getsize(out) / 2**30:.2f} GiB, {len(sd)} tensors); ComfyUI reads it as "
          f"{verdict}; eps std {float(eps.std()):.3f}; peak RSS {peak_gib():.1f} GiB")


def compare(a):
    import torch
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from memoguard.standalone.diffusers_model import load_model
    ref = torch.load(a.out + ".ref.pt", weights_only=True)
    t0 = time.time()
    dtype = getattr(torch, a.dtype)
    model = load_model(a.out, dtype=dtype)
    load_s = time.time() - t0
    enc = model.encode([ref["prompt"]])
    empty = model.encode([""])
    with torch.no_grad():
        eps = model.raw_prediction(ref["x"], torch.tensor([ref["t"]]), enc.embedding, enc.extra).float()

    def rel(a_, b):
        return float((a_.float() - b.float()).abs().max() / b.float().abs().max())

    print(f"{ref['family']}: memoguard loaded {os.path.basename(a.out)} in {load_s:.1f} s as {model.family} "
          f"({model.parameterization}, {model.prediction_source}; ComfyUI: {ref['comfy_model_type']}), latent "
          f"{model.latent_shape()}, image {model.image_size()}, key {model.model_key}")
    print(f"  text conditioning max rel diff {rel(enc.embedding, ref['cond']):.2e}, empty prompt "
          f"{rel(empty.embedding, ref['empty']):.2e}")
    if model.is_sdxl:
        print(f"  pooled max rel diff {rel(enc.extra['text_embeds'], ref['pooled'].float()):.2e}")
    print(f"  UNet eps max rel diff {rel(eps, ref['eps']):.2e} (eps std {float(ref['eps'].std()):.3f}); "
          f"peak RSS {peak_gib():.1f} GiB")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["make", "compare"])
    ap.add_argument("--family", choices=("sd15", "sd2", "sdxl"), default="sd2")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                    help="compare: memoguard's dtype (float16 halves the memory, SDXL in float32 needs ~14 GB)")
    ap.add_argument("--comfyui-dir", default=os.environ.get("COMFYUI_DIR", "/work/hosts/ComfyUI"))
    a = ap.parse_args()
    make(a) if a.step == "make" else compare(a)


if __name__ == "__main__":
    main()
