#!/usr/bin/env python
"""Random-weight Anima (circlestone-labs) model files for Forge Neo 2.26: the flow model with CFG of the Forge Neo
real-host suite (tests/a1111/test_real_forge_neo_flow.py). Run with Forge Neo's venv python (setup_forge_neo.sh
does):

  $NEO/venv/bin/python tests/hosts/make_random_anima.py [--neo HOSTS/forge-neo/webui] [--out HOSTS/models/anima]

Writes into --out (names fixed: the suite selects them through Neo's options route):
  random-anima.safetensors                 the DiT ("net." keys) with its LLM adapter (net.llm_adapter.*)
  random-anima-qwen3-06b.safetensors       Qwen3-0.6B text encoder ("model." keys)
  random-anima-qwen-image-vae.safetensors  Qwen-Image (Wan 2.1) VAE

Shapes come from Neo's own classes (backend.nn.anima.Anima, backend.nn.llm.llama.Qwen3_06B,
backend.nn.wan_vae.WanVAE) built on the meta device, with the config Neo's detection hard-codes
(huggingface_guess detection: model_channels must be 2048; 28 blocks, 16 heads fixed; Qwen3_06B config
fixed). So the DiT is full size (~2.0B params, 3.9 GiB in bf16): Neo cannot detect a smaller one. On 2 CPU cores a
64x64 image of 3 steps takes about 8 s, with 10-14 GiB of RAM.

Init: normal(0, min(0.02, 1/sqrt(fan_in))) for every >=2-D weight (embeddings: 0.02), normal(0, 0.02) for biases,
1 + normal(0, 0.02) for norm scales (1-D "weight", VAE "gamma"); no tensor is all zero. Buffers are not saved
(Neo recomputes them).
"""
import argparse
import math
import os
import sys
import time

ap = argparse.ArgumentParser()
HOSTS = os.environ.get("HOSTS", "/work/hosts")
ap.add_argument("--neo", default=f"{HOSTS}/forge-neo/webui")
ap.add_argument("--out", default=f"{HOSTS}/models/anima")
ap.add_argument("--seed", type=int, default=0)
# fp8 halves the file but Neo converts every weight at every call on a CPU: 1.6x slower than bf16
ap.add_argument("--dit-dtype", choices=["fp8", "bf16"], default="bf16")
ap.add_argument("--te-dtype", choices=["fp8", "bf16"], default="bf16")
ap.add_argument("--vae-dtype", choices=["bf16", "fp32"], default="bf16")
ap.add_argument("--only", choices=["dit", "te", "vae"], action="append", help="build only these (repeatable)")
opt = ap.parse_args()

NEO = os.path.abspath(opt.neo)
sys.path.insert(0, NEO)
sys.path.insert(0, os.path.join(NEO, "modules_forge", "packages"))
sys.argv = [sys.argv[0], "--cpu"]  # backend.args parses sys.argv at import

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from backend.operations import using_forge_operations  # noqa: E402

DT = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16, "fp32": torch.float32}
META = torch.device("meta")

# huggingface_guess/detection.py, the Anima branch (values it sets; model_channels asserted == 2048)
ANIMA_CONFIG = dict(in_channels=16, out_channels=16, patch_spatial=2, patch_temporal=1, model_channels=2048,
                    concat_padding_mask=True, crossattn_emb_channels=1024, adaln_lora_dim=256, num_blocks=28,
                    num_heads=16, rope_h_extrapolation_ratio=4.0, rope_w_extrapolation_ratio=4.0,
                    rope_t_extrapolation_ratio=1.0)


def on_meta(fn):
    with using_forge_operations(device=META, dtype=torch.float32):
        with torch.device(META):
            return fn()


def randomize(named_params, dtype, gen, prefix=""):
    out = {}
    for name, p in named_params:
        shape = tuple(p.shape)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "gamma" or (len(shape) == 1 and leaf == "weight"):
            t = 1.0 + 0.02 * torch.randn(shape, generator=gen)
        elif leaf == "bias" or len(shape) == 1:
            t = 0.02 * torch.randn(shape, generator=gen)
        elif "embed" in name and len(shape) == 2 and "proj" not in name:
            t = 0.02 * torch.randn(shape, generator=gen)  # token embedding tables
        else:
            fan_in = math.prod(shape[1:])
            t = min(0.02, 1.0 / math.sqrt(fan_in)) * torch.randn(shape, generator=gen)
        assert torch.count_nonzero(t) > 0, name
        out[prefix + name] = t.to(dtype).contiguous()
    return out


def save(sd, path, meta):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    save_file(sd, tmp, metadata=meta)
    os.replace(tmp, path)
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {path}: {len(sd)} tensors, {n/1e6:.1f}M params, {os.path.getsize(path)/2**30:.2f} GiB", flush=True)


def main():
    gen = torch.Generator().manual_seed(opt.seed)
    only = set(opt.only or ["dit", "te", "vae"])
    meta = {"memoguard": "random-weight Anima test model", "seed": str(opt.seed)}

    if "dit" in only:
        t0 = time.time()
        from backend.nn.anima import Anima, LLMAdapter

        dit = on_meta(lambda: Anima(**ANIMA_CONFIG))
        adapter = on_meta(lambda: LLMAdapter())
        sd = randomize(dit.named_parameters(), DT[opt.dit_dtype], gen, "net.")
        sd.update(randomize(adapter.named_parameters(), DT[opt.dit_dtype], gen, "net.llm_adapter."))
        save(sd, os.path.join(opt.out, "random-anima.safetensors"), meta)
        del sd
        print(f"  dit {time.time()-t0:.0f}s", flush=True)

    if "te" in only:
        t0 = time.time()
        from backend.nn.llm.llama import Qwen3_06B

        te = on_meta(lambda: Qwen3_06B({}))
        params = [(n, p) for n, p in te.named_parameters() if not n.startswith("llm_adapter.")]
        sd = randomize(params, DT[opt.te_dtype], gen)
        save(sd, os.path.join(opt.out, "random-anima-qwen3-06b.safetensors"), meta)
        del sd
        print(f"  te {time.time()-t0:.0f}s", flush=True)

    if "vae" in only:
        t0 = time.time()
        from backend.nn.wan_vae import WanVAE

        cfg = WanVAE.load_config(os.path.join(NEO, "backend", "huggingface", "circlestone-labs", "Anima", "vae"))
        vae = on_meta(lambda: WanVAE.from_config(cfg))
        sd = randomize(vae.named_parameters(), DT[opt.vae_dtype], gen)
        assert "decoder.middle.0.residual.0.gamma" in sd and "post_quant_conv.weight" not in sd
        save(sd, os.path.join(opt.out, "random-anima-qwen-image-vae.safetensors"), meta)
        print(f"  vae {time.time()-t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
