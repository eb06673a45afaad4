"""Audit throughput (issue 12, item 3): `scan`'s scoring against the raw batched UNet forwards it needs.

    .venv/bin/python benchmarks/audit_throughput.py [--model PATH] [--prompts 256] [--batch-size 16] [--json F]

Per batch of prompts the audit tokenizes and encodes them and runs one conditional UNet evaluation per
prompt x seed at the first timestep; the unconditional half of the CFG pair is the same for every prompt
(same x_T per seed) and is evaluated once per scan (memoguard.measure.FirstStep). Raw sides, on embeddings
and x_T prepared beforehand:
  - "conditional": the batch's conditional UNet call, the forwards the audit needs (the target's raw side);
  - "encoder + conditional": the text encoder on token ids prepared beforehand, then that call, so that the
    ratio is what MemoGuard itself adds to the model forwards an audit cannot skip;
  - "CFG pair": the batched cond + uncond call (2 x batch images) a scorer without the shared half makes.
They alternate `--repeats` times in one process (machines are noisy) and the medians give the ratios;
target: scoring at >= 90 % of the raw throughput. The shared unconditional evaluation is a constant of the
scan (one image per seed, whatever the number of prompts); it is timed too, and "steady" is the audit without
it, the rate of a long audit. Explanation (`--explain K`) is timed apart.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memoguard.calibration import default_benign_prompts  # noqa: E402
from memoguard.cli.scan import scan_batches  # noqa: E402
from memoguard.sampling import initial_noise  # noqa: E402
from memoguard.standalone.diffusers_model import load_model  # noqa: E402

STEPS = 50


def audit(model, prompts, batch_size, explain):
    rows = [(p, None) for p in prompts]
    start = time.perf_counter()
    for _ in scan_batches(model, rows, None, steps=STEPS, explain=explain, batch_size=batch_size):
        pass
    return time.perf_counter() - start


def raw_inputs(model, prompts, batch_size):
    uncond = model.encode([""]).embedding
    t = model.timesteps(STEPS)[0]
    batches = []
    for start in range(0, len(prompts), batch_size):
        part = prompts[start:start + batch_size]
        emb = model.encode(part).embedding
        x = initial_noise(model, model.latent_shape(), [0] * len(part), model.device)
        ids = model.tokenizers[0](part, padding="max_length", max_length=77, truncation=True,
                                  return_tensors="pt").input_ids.to(model.device)
        batches.append((x, emb, uncond.expand(len(part), -1, -1), ids))
    return t, batches


@torch.no_grad()
def shared_uncond(model, t):
    """What each scan evaluates once: eps(x_T, "") of its one seed."""
    uncond, x = model.encode([""]), initial_noise(model, model.latent_shape(), [0], model.device)
    start = time.perf_counter()
    model.eps_uncond(x, t, uncond, uncond.embedding.shape[1])
    return time.perf_counter() - start


@torch.no_grad()
def raw(model, t, batches, side):
    start = time.perf_counter()
    for x, emb, uncond, ids in batches:
        if side == "encoder + conditional":
            model.text_encoders[0](ids)
        if side == "CFG pair":
            x, emb = torch.cat([x, x]), torch.cat([emb, uncond])
        model.unet(x.to(model.dtype), t, encoder_hidden_states=emb.to(model.dtype))
    return time.perf_counter() - start


SIDES = ("conditional", "encoder + conditional", "CFG pair")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="diffusers folder or single file (default: bundled)")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--explain", type=int, default=3, help="top tokens for the explanation timing (0: skip it)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    model = load_model(args.model)
    if model.is_sdxl:
        sys.exit("SD1.x / SD2.x only: the raw side here passes no SDXL added conditioning")
    prompts = (default_benign_prompts() * (args.prompts // 300 + 1))[:args.prompts]
    t, batches = raw_inputs(model, prompts, args.batch_size)
    audit(model, prompts[:args.batch_size], args.batch_size, 0)  # warm-up of every path
    for side in SIDES:
        raw(model, t, batches[:1], side)
    audit_s, constant_s, raw_s = [], [], {side: [] for side in SIDES}
    for _ in range(args.repeats):
        audit_s.append(audit(model, prompts, args.batch_size, 0))
        constant_s.append(shared_uncond(model, t))
        for side in SIDES:
            raw_s[side].append(raw(model, t, batches, side))
    a, c = statistics.median(audit_s), statistics.median(constant_s)
    share = {side: statistics.median(raw_s[side]) / a for side in SIDES}
    steady = {side: statistics.median(raw_s[side]) / (a - c) for side in SIDES}
    out = {"model": model.name, "latent": list(model.latent_shape()), "prompts": len(prompts),
           "batch_size": args.batch_size, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
           "audit_s": audit_s, "raw_s": raw_s, "audit_prompts_per_s": len(prompts) / a,
           "raw_prompts_per_s": {side: len(prompts) / statistics.median(raw_s[side]) for side in SIDES},
           "audit_share_of_raw": share, "shared_uncond_s": constant_s, "steady_share_of_raw": steady}
    print(f"{model.name} {out['latent']}: scoring {out['audit_prompts_per_s']:.2f} prompts/s (median of "
          f"{args.repeats}, batches of {args.batch_size})")
    for side in SIDES:
        print(f"  raw {side}: {out['raw_prompts_per_s'][side]:.2f} prompts/s; scoring at {100 * share[side]:.1f} % "
              f"(steady: {100 * steady[side]:.1f} %)")
    print(f"  the scan's one shared uncond evaluation: {c:.3f} s")
    if args.explain:
        n = min(len(prompts), args.batch_size)
        out["explain_prompts"] = n
        out["explain_s"] = audit(model, prompts[:n], args.batch_size, args.explain)
        print(f"with explanation (top {args.explain}): {n / out['explain_s']:.2f} prompts/s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
