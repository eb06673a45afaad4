"""MemoGuard Mitigation inside ComfyUI's sampler next to the core's bench, on the same prompts and seeds.

    COMFYUI_DIR=/path/to/ComfyUI python benchmarks/comfyui_mitigation.py [--core-python PYTHON] [--seeds 0 1 2 3]
        [--strategy minimize|mask_padding|remove_tokens]

Run with ComfyUI's Python. Prompts and target come from the core bench's results
(`python -m memoguard bench --json benchmarks/bench_full.json`): the prompts its mitigation
bench uses (copying positives that describe a scene, the first 24) and its target (median
first-step score of the negatives). Both sides: the strategy at that target (minimize: AdamW lr 0.05, at most
10 iterations; remove_tokens: at most 3 words), 20-step DDIM at the bundled model's guidance, x_T from one CPU
generator per seed.
- core: memoguard.mitigate + memoguard.sampling on the diffusers model, in a subprocess of --core-python (an
  environment with memoguard's diffusers/transformers).
- ComfyUI: the MemoGuard Tiny Model Loader, MemoGuard Text Encode (the positive prompt) and MemoGuard
  Mitigation nodes, a Memorization Monitor behind them, comfy.sample.sample with sampler ddim and scheduler
  ddim_uniform (its first sigma is the core's first DDIM timestep, 951); one prompt per sampler call, its seeds
  as the batch.
Prints first-step score before/after, the share of images at or under the target, iterations and
copy rates (memoguard.tiny.judge) per side, and how far the two sides' per-image scores differ.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20      # memoguard.cli.bench.MITIGATION_STEPS
LR, MAX_ITERS = 0.05, 10


def bench_setup(bench_json: Path, n_prompts: int):
    """(prompts, target) exactly as memoguard.cli.bench.run_bench hands them to mitigation_bench."""
    res = json.loads(bench_json.read_text())
    prompts = [p["text"] for p in res["prompts"] if p["positive"] and p["kind"] != "random"][:n_prompts]
    row = res["mitigation"]["minimize_p50"]  # its target is the benign median, every *_p50 row's
    return prompts, row["settings"]["target"], row


def copies(images: np.ndarray) -> np.ndarray:
    from memoguard.tiny.evalsets import eval_set
    return eval_set("shapes").is_copy(images)


def core_side(prompts, seeds, target, strategy) -> dict:
    from memoguard.mitigate import mitigate
    from memoguard.standalone.diffusers_model import load_model
    from memoguard.sampling import initial_noise, sample
    model = load_model(None)
    cond, uncond = model.encode([t for t in prompts for _ in seeds]), model.encode([""])
    x = initial_noise(model, model.latent_shape(), list(seeds) * len(prompts), model.device)
    plan = mitigate(model, cond, uncond, x, model.timesteps(STEPS), model.guidance, strategy=strategy, target=target,
                    lr=LR, max_iters=MAX_ITERS)
    record = plan.record
    plain = sample(model, cond, uncond, x, STEPS, monitor=False)
    mitigated = sample(model, plan.cond, uncond, x, STEPS, monitor=False)
    return {"guidance": model.guidance, "before": record.before, "after": record.after,
            "iterations": record.image_iterations,
            "copy_before": copies(model.decode(plain.latents).numpy()).tolist(),
            "copy_after": copies(model.decode(mitigated.latents).numpy()).tolist()}


def comfyui_side(prompts, seeds, target, guidance, strategy) -> dict:
    from comfyui_host import load_comfy
    load_comfy()
    import comfy.sample
    from comfy_api.latest import io
    from memoguard_pack.nodes.mitigation_hook import session_of
    from memoguard_pack.nodes.monitor_hook import MonitorSession, MonitorSettings, attach_monitor
    from memoguard_pack.nodes.nodes_loader import MemoGuardTinyModelLoader
    from memoguard_pack.nodes.nodes_mitigation import EmbeddingMinimization
    from memoguard_pack.nodes.nodes_text_encode import MemoGuardTextEncode
    from nodes import CLIPTextEncode  # ComfyUI's own

    out = {k: [] for k in ("before", "after", "iterations", "sampler_first_step", "copy_before", "copy_after")}
    with torch.inference_mode():  # as ComfyUI executes nodes
        model, clip, vae = MemoGuardTinyModelLoader.execute("").result
        minimization = EmbeddingMinimization.PREPARE_CLASS_CLONE({io.Hidden.unique_id: "11"})
        mitigated_model = minimization.execute(model, "always", target, LR, MAX_ITERS, "none", "", 0.01, 0.0,
                                              strategy).result[0]
        monitor = MonitorSession(MonitorSettings(), emit=lambda e, d: None, show=lambda t, n: None)
        watched = attach_monitor(mitigated_model, monitor)
        negative = CLIPTextEncode().encode(clip, "")[0]
        latent = torch.zeros(len(seeds), 3, 16, 16)  # Empty Latent Image 128x128 -> 16x16 pixels here
        noise = torch.cat([comfy.sample.prepare_noise(latent[:1], s) for s in seeds])
        for text in prompts:
            positive = MemoGuardTextEncode.execute(text, clip).result[0]
            run = lambda m: comfy.sample.sample(m, noise, STEPS, guidance, "ddim", "ddim_uniform", positive, negative,
                                                latent, disable_pbar=True, seed=seeds[0])
            plain, mitigated = run(model), run(watched)
            record = session_of(mitigated_model).record
            out["before"] += record.before
            out["after"] += record.after
            out["iterations"] += record.image_iterations
            out["sampler_first_step"] += monitor.trace.per_step()[0].tolist()
            out["copy_before"] += copies(vae.decode(plain).numpy()).tolist()
            out["copy_after"] += copies(vae.decode(mitigated).numpy()).tolist()
    return out


def summary(side: dict, target: float) -> dict:
    after = np.array(side["after"])
    return {"images": len(after), "score before": np.mean(side["before"]), "score after": after.mean(),
            "share at/under target": np.mean(after <= target), "mean iterations": np.mean(side["iterations"]),
            "copy rate before": np.mean(side["copy_before"]), "copy rate after": np.mean(side["copy_after"])}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-json", type=Path, default=ROOT / "benchmarks" / "bench_full.json")
    ap.add_argument("--prompts", type=int, default=24, help="how many of the bench's mitigation prompts")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--core-python", default=sys.executable, help="Python with memoguard's diffusers/transformers")
    ap.add_argument("--strategy", default="minimize", choices=("minimize", "mask_padding", "remove_tokens"))
    ap.add_argument("--core-side", action="store_true", help=argparse.SUPPRESS)  # the subprocess
    args = ap.parse_args()
    prompts, target, bench = bench_setup(args.bench_json, args.prompts)
    if args.core_side:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(core_side(prompts, args.seeds, target, args.strategy)))
        return
    core_run = subprocess.run([args.core_python, __file__, "--core-side", "--bench-json", str(args.bench_json),
                               "--prompts", str(args.prompts), "--strategy", args.strategy, "--seeds",
                               *map(str, args.seeds)],
                              capture_output=True, text=True)
    if core_run.returncode:
        sys.exit(f"core side failed:\n{core_run.stderr[-3000:]}")
    core = json.loads(core_run.stdout.strip().splitlines()[-1])
    comfy = comfyui_side(prompts, args.seeds, target, core["guidance"], args.strategy)

    print(f"{args.strategy}: {len(prompts)} prompts x seeds {args.seeds}; target {target:.4f} (bench: benign median); "
          f"lr {LR}, <= {MAX_ITERS} iterations; {STEPS}-step DDIM, guidance {core['guidance']}")
    if args.strategy == "minimize":
        print(f"core bench ({args.bench_json.name}, seeds 0-3, one batch): score {bench['score_before']:.4f} -> "
              f"{bench['score_after']:.4f}, copy {bench['copy_rate_before']:.2f} -> {bench['copy_rate_after']:.2f}, "
              f"mean iterations {bench['mean_iterations']:.2f}")
    rows = summary(core, target), summary(comfy, target)
    print(f"{'':<24} {'core (diffusers)':>17} {'ComfyUI sampler':>16}")
    for key in rows[0]:
        fmt = (lambda v: f"{v:d}") if key == "images" else (lambda v: f"{v:.4f}")
        print(f"{key:<24} {fmt(rows[0][key]):>17} {fmt(rows[1][key]):>16}")
    diff = lambda k: np.max(np.abs(np.array(core[k]) - np.array(comfy[k])))
    print(f"max |core - ComfyUI| per image: score before {diff('before'):.2e}, after {diff('after'):.2e}; "
          f"ComfyUI's step-0 score vs its mitigation's 'after': "
          f"{np.max(np.abs(np.array(comfy['sampler_first_step']) - np.array(comfy['after']))):.2e}")


if __name__ == "__main__":
    main()
