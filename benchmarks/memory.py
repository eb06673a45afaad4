"""Peak memory of MemoGuard's explanation and mitigation against plain sampling (issue 11).

    .venv/bin/python benchmarks/memory.py --json benchmarks/memory.json
    .venv/bin/python benchmarks/memory.py --quick        # batch 1 only
    .venv/bin/python benchmarks/memory.py --family sdxl --quick --json benchmarks/memory_sdxl.json

An SD1.5-size random-weight UNet (memoguard/assets/configs/sd1/unet, 860 M parameters, fp32, eval mode,
weights frozen as the hosts hold them) behind a minimal `memoguard.model.Denoiser`, at a 4x64x64 latent
(512 px) and t = 999, the first step. Random prompt embeddings (B, 77, 768) and one random (1, 77, 768)
negative. Each measurement runs in its own child process, so that peaks do not mix:
- plain: one classifier-free-guidance pair (`Denoiser.eps_pair`) under no_grad, what a sampling step costs;
- explain: `memoguard.explain.token_contributions`, method gradient_x_delta, one step;
- mitigate: `memoguard.mitigate.minimize_embedding`, mode always, lr 0.05, `--max-iters` AdamW iterations;
- explain with diffusers gradient checkpointing (`unet.enable_gradient_checkpointing()`, still eval mode).
explain and mitigate run with grad_batch 1 (the default: one image per backward pass) and, at batch > 1,
grad_batch = batch (every image in one backward pass).

CPU only: the process peak is `getrusage(RUSAGE_SELF).ru_maxrss`, with the kernel's high-water mark reset
(/proc/self/clear_refs) once the UNet is built, so the figure is the mode's own peak; activation memory is
that peak minus the resident size after building the UNet (the weights). On a GPU the counterpart would
be torch.cuda.max_memory_allocated; this script does not measure it.

--family sdxl: the SDXL-size UNet (memoguard/assets/configs/sdxl/unet, 2.6 B parameters, about 10 GB in
fp32) at the same 4x64x64 latent (512 px; a 128x128 latent, 1024 px, is not measured), with SDXL's extra
conditioning passed through the Denoiser's `extra`: prompt embeddings (B, 77, 2048) and
added_cond_kwargs text_embeds (B, 1280) (random pooled text) and time_ids (B, 6) (original size 512x512,
crop 0,0, target size 512x512), the negative carrying the same keys. Its rows are plain, explain and
mitigate at batch 1 (--quick), and explain with gradient checkpointing besides without --quick.
"""
import argparse
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "memoguard" / "assets" / "configs"
# per family: the name it prints, its config folder, the prompt embedding width, and the pooled-text width
# (None: no added conditioning)
FAMILIES = {
    "sd15": {"name": "SD1.5", "configs": "sd1", "context": 768, "pooled": None},
    "sdxl": {"name": "SDXL", "configs": "sdxl", "context": 2048, "pooled": 1280},
}
LATENT = 64
TIMESTEP = 999
TARGET = 1.5  # issue 11: explanation and mitigation peak <= 1.5x plain sampling's peak
MIB = 1024.0  # ru_maxrss and /proc figures are KiB


# -- measuring (child side) ----------------------------------------------------------------------------
def maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def proc_status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


def reset_peak() -> bool:
    """Reset the kernel's resident-set high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PhaseMeter:
    """Peak RSS per phase: at each phase change the peak so far is recorded and the high-water mark reset."""

    def __init__(self, can_reset: bool):
        self.can_reset = can_reset
        self.phase = None
        self.start = None
        self.phases = []  # [label, peak KiB, resident KiB when the phase began]

    def enter(self, label: str) -> None:
        if label == self.phase:
            return
        self.close()
        self.phase, self.start = label, proc_status()["VmRSS"]

    def close(self) -> None:
        if self.phase is not None:
            self.phases.append([self.phase, maxrss_kib(), self.start])
            if self.can_reset:
                reset_peak()
        self.phase = None

    def peak(self) -> int:
        return max(kib for _, kib, _ in self.phases)


def unet_config(family: str) -> Path:
    return CONFIGS / FAMILIES[family]["configs"] / "unet" / "config.json"


def scheduler_config(family: str) -> Path:
    return CONFIGS / FAMILIES[family]["configs"] / "scheduler" / "scheduler_config.json"


def make_denoiser(family: str, checkpointing: bool):
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from memoguard.model import Denoiser
    from memoguard.score import coefficients_vp

    class UNetDenoiser(Denoiser):
        """A diffusers UNet as the minimal adapter; every UNet call tells the meter which phase it is in."""
        parameterization = "eps"

        def __init__(self, unet, alphas_cumprod):
            self.unet = unet
            self.alphas_cumprod = alphas_cumprod
            self.on_call = None
            self.calls = []  # (images, grad enabled) per UNet call

        def raw_prediction(self, x, t, embedding, extra):
            grad = torch.is_grad_enabled()
            if self.on_call is not None:
                self.on_call(grad)
            self.calls.append((x.shape[0], grad))
            # SDXL's text_embeds / time_ids arrive in extra, already batched like x (Denoiser.eps / eps_pair)
            return self.unet(x, t, encoder_hidden_states=embedding, added_cond_kwargs=extra or None).sample

        def coefficients(self, t):
            return coefficients_vp(self.alphas_cumprod, t)

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(json.loads(unet_config(family).read_text()))
    unet.eval().requires_grad_(False)
    if checkpointing:
        unet.enable_gradient_checkpointing()  # honoured under torch.is_grad_enabled(), in eval mode too
    scheduler = DDIMScheduler.from_config(json.loads(scheduler_config(family).read_text()))
    params = sum(p.numel() for p in unet.parameters())
    return UNetDenoiser(unet, scheduler.alphas_cumprod.float()), params


def inputs(batch: int, family: str):
    import torch

    from memoguard.hosts import chunked_encoding, empty_encoding
    fam = FAMILIES[family]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, LATENT, LATENT, generator=g)
    cond_emb = torch.randn(batch, 77, fam["context"], generator=g)
    uncond_emb = torch.randn(1, 77, fam["context"], generator=g)
    if fam["pooled"] is None:
        return x, chunked_encoding(cond_emb), empty_encoding(uncond_emb)
    px = LATENT * 8
    time_ids = torch.tensor([[px, px, 0, 0, px, px]], dtype=torch.float32)  # original size, crop, target size
    cond_extra = {"text_embeds": torch.randn(batch, fam["pooled"], generator=g), "time_ids": time_ids.expand(batch, 6)}
    uncond_extra = {"text_embeds": torch.randn(1, fam["pooled"], generator=g), "time_ids": time_ids.clone()}
    return x, chunked_encoding(cond_emb, extra=cond_extra), empty_encoding(uncond_emb, uncond_extra)


def child(args) -> dict:
    import torch

    from memoguard.explain import token_contributions
    from memoguard.mitigate import minimize_embedding

    args.mode = args.child
    start = time.perf_counter()
    model, params = make_denoiser(args.family, args.checkpointing)
    x, cond, uncond = inputs(args.batch, args.family)
    gc.collect()
    build_s = time.perf_counter() - start
    build_peak = maxrss_kib()
    after_weights = proc_status()["VmRSS"]
    can_reset = reset_peak()
    meter = PhaseMeter(can_reset)
    chunks = math.ceil(args.batch / args.grad_batch)
    grad_calls = [0]

    def on_call(grad: bool) -> None:
        if args.mode == "plain":
            meter.enter("cfg pair")
        elif grad:
            done = grad_calls[0]
            grad_calls[0] += 1
            meter.enter("gradient passes" if args.mode == "explain" else f"iteration {done // chunks + 1}")
        else:
            meter.enter("no-grad first step" if grad_calls[0] == 0 else "no-grad final measure")

    model.on_call = on_call
    t = torch.tensor(TIMESTEP)
    out = {}
    run_start = time.perf_counter()
    if args.mode == "plain":
        with torch.no_grad():
            eps_c, eps_u = model.eps_pair(x, t, cond, uncond)
        out["gap"] = (eps_c - eps_u).flatten(1).norm(dim=1).tolist()
    elif args.mode == "explain":
        res = token_contributions(model, cond, uncond, x, steps=1, total_steps=1, timesteps=[t],
                                  method="gradient_x_delta", grad_batch=args.grad_batch)
        out["contributions"] = [r.scores for r in res]
    elif args.mode == "mitigate":
        _, record = minimize_embedding(model, cond, uncond, x, t, mode="always", lr=0.05,
                                       max_iters=args.max_iters, grad_batch=args.grad_batch)
        out["before"], out["after"], out["iterations"] = record.before, record.after, record.iterations
    else:
        raise SystemExit(f"unknown mode {args.mode!r}")
    run_s = time.perf_counter() - run_start
    meter.close()
    peak = meter.peak() if can_reset else maxrss_kib()
    return {
        "family": args.family, "mode": args.mode, "batch": args.batch, "grad_batch": args.grad_batch if args.mode != "plain" else None,
        "checkpointing": args.checkpointing, "training_mode": model.unet.training,
        "checkpointing_active": model.unet.is_gradient_checkpointing, "parameters": params,
        "build_s": round(build_s, 1), "run_s": round(run_s, 1), "threads": torch.get_num_threads(),
        "build_peak_mib": round(build_peak / MIB, 1), "after_weights_mib": round(after_weights / MIB, 1),
        "peak_reset": can_reset, "process_peak_mib": round(peak / MIB, 1),
        "activation_mib": round((peak - after_weights) / MIB, 1),
        # per phase: label, process peak, activation (peak - after weights), resident above the weights when the
        # phase began (memory the allocator kept from earlier phases), all MiB
        "phases": [[label, round(kib / MIB, 1), round((kib - after_weights) / MIB, 1),
                    round((begin - after_weights) / MIB, 1)] for label, kib, begin in meter.phases],
        "unet_calls": model.calls, "result": out,
    }


# -- running the children (parent side; imports no torch) ---------------------------------------------
def cases(quick: bool, family: str = "sd15"):
    """(mode, batch, grad_batch, checkpointing) in the order they run."""
    if family == "sdxl":  # batch 1 only: the 10 GB of fp32 weights leave no room for batch 4 on a 24 GiB machine
        out = [("plain", 1, 1, False), ("explain", 1, 1, False), ("mitigate", 1, 1, False)]
        return out if quick else out + [("explain", 1, 1, True)]
    out = [("plain", 1, 1, False), ("explain", 1, 1, False), ("mitigate", 1, 1, False), ("explain", 1, 1, True)]
    if not quick:
        out += [("plain", 4, 1, False), ("explain", 4, 1, False), ("explain", 4, 4, False),
                ("mitigate", 4, 1, False), ("mitigate", 4, 4, False)]
    return out


def run_child(mode, batch, grad_batch, checkpointing, max_iters, family="sd15") -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--batch", str(batch),
           "--grad-batch", str(grad_batch), "--max-iters", str(max_iters), "--family", family]
    if checkpointing:
        cmd.append("--checkpointing")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = round(time.perf_counter() - start, 1)
    base = {"family": family, "mode": mode, "batch": batch, "grad_batch": grad_batch if mode != "plain" else None,
            "checkpointing": checkpointing, "wall_s": wall}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return {**json.loads(lines[-1]), "wall_s": wall}
    err = proc.stderr.strip().splitlines()[-1:] or [""]
    oom = proc.returncode in (-9, 137) or any(s in proc.stderr for s in ("out of memory", "can't allocate",
                                                                             "MemoryError"))
    return {**base, "error": "out of memory" if oom else f"failed (exit {proc.returncode}): {err[0]}"}


def label(row) -> str:
    return row["mode"] + (" (checkpointing)" if row.get("checkpointing") else "")


def add_ratios(rows) -> None:
    plain = {r["batch"]: r for r in rows if r["mode"] == "plain" and "error" not in r}
    for r in rows:
        p = plain.get(r["batch"])
        if "error" in r or p is None:
            continue
        r["peak_ratio"] = round(r["process_peak_mib"] / p["process_peak_mib"], 2)
        r["activation_ratio"] = round(r["activation_mib"] / p["activation_mib"], 2)


def table(rows) -> str:
    head = ("| mode | batch | grad_batch | after weights (MiB) | process peak (MiB) | activation (MiB) "
            "| peak / plain | activation / plain | run (s) |")
    out = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gb = "–" if r["grad_batch"] is None else str(r["grad_batch"])
        if "error" in r:
            out.append(f"| {label(r)} | {r['batch']} | {gb} | {r['error']} | | | | | |")
            continue
        out.append(f"| {label(r)} | {r['batch']} | {gb} | {r['after_weights_mib']:.0f} | {r['process_peak_mib']:.0f} "
                   f"| {r['activation_mib']:.0f} | {r.get('peak_ratio', float('nan')):.2f} "
                   f"| {r.get('activation_ratio', float('nan')):.2f} | {r['run_s']:.1f} |")
    return "\n".join(out)


def phases(rows) -> str:
    out = []
    for r in rows:
        if "error" in r or r["mode"] == "plain":
            continue
        parts = ", ".join(f"{name} {act:.0f} (from {begin:.0f})" for name, _, act, begin in r["phases"])
        out.append(f"  {label(r)}, batch {r['batch']}, grad_batch {r['grad_batch']}: activation MiB per phase "
                   f"(resident above the weights when it began): {parts}")
    return "\n".join(out)


def agreement(rows) -> dict:
    """Largest difference of the results between settings that must agree (same seeds and inputs)."""
    def find(mode, batch, gb, ck):
        return next((r for r in rows if (r["mode"], r["batch"], r["grad_batch"], r["checkpointing"]) == (mode, batch, gb, ck)
                     and "error" not in r), None)

    def diff(a, b, key):
        if a is None or b is None:
            return None
        flat = lambda v: [y for x in v for y in (x if isinstance(x, list) else [x])]
        return max(abs(p - q) for p, q in zip(flat(a["result"][key]), flat(b["result"][key])))

    return {
        "explain_checkpointing_vs_not_batch1": diff(find("explain", 1, 1, False), find("explain", 1, 1, True),
                                                    "contributions"),
        "explain_grad_batch_4_vs_1": diff(find("explain", 4, 1, False), find("explain", 4, 4, False), "contributions"),
        "mitigate_grad_batch_4_vs_1_after": diff(find("mitigate", 4, 1, False), find("mitigate", 4, 4, False), "after"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 1 only (sdxl: plain, explain, mitigate)")
    ap.add_argument("--family", choices=sorted(FAMILIES), default="sd15",
                    help="UNet size: sd15 (860 M parameters) or sdxl (2.6 B, with text_embeds / time_ids)")
    ap.add_argument("--json", type=Path, help="write the rows and the machine here")
    ap.add_argument("--max-iters", type=int, default=2, help="mitigation iterations")
    ap.add_argument("--child", metavar="MODE", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--grad-batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, str(ROOT))
        try:
            row = child(args)
        except (MemoryError, RuntimeError) as exc:
            if isinstance(exc, MemoryError) or "allocate" in str(exc) or "out of memory" in str(exc):
                print("out of memory: " + str(exc)[:200], file=sys.stderr)
                raise SystemExit(3)
            raise
        print(json.dumps(row))
        return

    start = time.perf_counter()
    fam = FAMILIES[args.family]
    print(f"{fam['name']}-size random-weight UNet, fp32, CPU ({os.cpu_count()} cores), latent 4x{LATENT}x{LATENT}, t={TIMESTEP}; "
          "each row a fresh process. CPU only: process peak = ru_maxrss (no GPU measured, so no "
          "torch.cuda.max_memory_allocated).", flush=True)
    rows = []
    for mode, batch, gb, ck in cases(args.quick, args.family):
        row = run_child(mode, batch, gb, ck, args.max_iters, args.family)
        rows.append(row)
        state = row.get("error") or f"peak {row['process_peak_mib']:.0f} MiB, activation {row['activation_mib']:.0f} MiB"
        print(f"  {label(row)} batch {batch} grad_batch {gb}: {state} ({row['wall_s']:.0f} s)", flush=True)
    add_ratios(rows)
    print()
    print(table(rows))
    print()
    print(phases(rows))
    checks = agreement(rows)
    print("largest result difference between settings that must agree: "
          + ", ".join(f"{k} {v:.2e}" if v is not None else f"{k} n/a" for k, v in checks.items()))
    defaults = [r for r in rows if r["mode"] in ("explain", "mitigate") and r.get("grad_batch") == 1
                and not r["checkpointing"] and "peak_ratio" in r]
    met = bool(defaults) and all(r["peak_ratio"] <= TARGET for r in defaults)
    worst = max((r["peak_ratio"] for r in defaults), default=float("nan"))
    verdict = "not measured" if not defaults else f"{'met' if met else 'NOT met'} (largest ratio {worst:.2f})"
    print(f"target: explain/mitigate process peak <= {TARGET}x plain at the default grad_batch 1: {verdict}")
    if args.family == "sdxl":
        print(f"SDXL-size at a {LATENT}x{LATENT} latent ({LATENT * 8} px) only: 1024 px (a 128x128 latent) not measured")
    else:
        print("SDXL-size: see --family sdxl (a 64x64 latent; 1024 px not measured)")
    total = round(time.perf_counter() - start, 1)
    print(f"total {total:.0f} s")
    if args.json:
        machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                   "python": platform.python_version(), "dtype": "float32", "device": "cpu",
                   "memory_measure": "ru_maxrss after resetting the high-water mark once the UNet is built"}
        args.json.write_text(json.dumps({"machine": machine, "family": args.family,
                                         "unet_config": str(unet_config(args.family).relative_to(ROOT)),
                                         "latent": LATENT, "timestep": TIMESTEP,
                                         "max_iters": args.max_iters, "target": TARGET, "target_met": met,
                                         "agreement": checks, "total_s": total, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
