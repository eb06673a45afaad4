"""Audit throughput (issue 12, item 3): `scan`'s scoring against the raw batched UNet forwards it needs.

    .venv/bin/python benchmarks/audit_throughput.py [--model PATH] [--prompts 64] [--batch-size 16] [--json F]

Per batch of prompts the audit encodes them, draws x_T and runs one CFG pair (2 x batch images) at the
first timestep. The raw side runs only that UNet call, on embeddings and x_T prepared beforehand; a third
side adds the text-encoder forward of the batch's token ids (tokenized beforehand), so that the last ratio
is what MemoGuard itself adds to the model forwards an audit cannot skip. The three alternate `--repeats`
times in one process (machines are noisy) and the medians give the ratios; target: scoring at >= 90 % of
the raw UNet throughput. Explanation (`--explain K`) is timed apart: it is extra work.
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
        batches.append((torch.cat([x, x]), torch.cat([emb, uncond.expand(len(part), -1, -1)]), ids))
    return t, batches


@torch.no_grad()
def raw(model, t, batches, with_encoder=False):
    start = time.perf_counter()
    for x2, emb2, ids in batches:
        if with_encoder:
            model.text_encoders[0](ids)
        model.unet(x2.to(model.dtype), t, encoder_hidden_states=emb2.to(model.dtype))
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="diffusers folder or single file (default: bundled)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--explain", type=int, default=3, help="top tokens for the explanation timing (0: skip it)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    model = load_model(args.model)
    if model.is_sdxl:
        sys.exit("SD1.x / SD2.x only: the raw side here passes no SDXL added conditioning")
    prompts = (default_benign_prompts() * (args.prompts // 300 + 1))[:args.prompts]
    t, batches = raw_inputs(model, prompts, args.batch_size)
    audit(model, prompts[:args.batch_size], args.batch_size, 0)  # warm-up of both paths
    raw(model, t, batches[:1])
    audit_s, raw_s, forwards_s = [], [], []
    for _ in range(args.repeats):
        audit_s.append(audit(model, prompts, args.batch_size, 0))
        raw_s.append(raw(model, t, batches))
        forwards_s.append(raw(model, t, batches, with_encoder=True))
    a, r, f = statistics.median(audit_s), statistics.median(raw_s), statistics.median(forwards_s)
    out = {"model": model.name, "latent": list(model.latent_shape()), "prompts": len(prompts),
           "batch_size": args.batch_size, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
           "audit_s": audit_s, "raw_s": raw_s, "audit_prompts_per_s": len(prompts) / a,
           "raw_prompts_per_s": len(prompts) / r, "scoring_share_of_raw": r / a, "forwards_s": forwards_s,
           "scoring_share_of_encoder_and_unet": f / a}
    print(f"{model.name} {out['latent']}: scoring {out['audit_prompts_per_s']:.2f} prompts/s, raw UNet "
          f"{out['raw_prompts_per_s']:.2f} prompts/s: {100 * out['scoring_share_of_raw']:.1f} % of raw "
          f"(median of {args.repeats}, batches of {args.batch_size}); {100 * f / a:.1f} % of the text encoder + "
          f"UNet forwards")
    if args.explain:
        n = min(len(prompts), args.batch_size)
        out["explain_prompts"] = n
        out["explain_s"] = audit(model, prompts[:n], args.batch_size, args.explain)
        print(f"with explanation (top {args.explain}): {n / out['explain_s']:.2f} prompts/s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
