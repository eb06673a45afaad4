"""The mitigation table of `bench` on its own, with the labels of an earlier bench run.

    .venv/bin/python benchmarks/mitigation_table.py --labels benchmarks/bench_full.json --json benchmarks/mitigation_table.json

Same prompts (the first 24 positives with a described scene), seeds, 20 DDIM steps, targets (percentiles
of the negatives' first-step scores) and side-by-side timing as `python -m memoguard bench`, without
re-running its labelling, detection and explanation parts (~30 min of the full run).
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from memoguard.cli.bench import (DEFAULT_MITIGATION, HOST_MITIGATION, MITIGATION_STEPS, SEEDS, mitigation_bench,
                             mitigation_settings)
from memoguard.standalone.diffusers_model import load_model
from memoguard.tiny.data import build_dataset
from memoguard.sampling import initial_noise, sample
from memoguard.tiny.judge import alignment, unique_training_images
from memoguard.tiny.prompts import eval_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", type=Path, required=True, help="a full `bench --json` result (its prompts and labels)")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    bench = json.loads(args.labels.read_text())
    if bench.get("quick"):
        raise SystemExit("--labels must come from a full bench run (the table uses its 393 prompts)")
    torch.manual_seed(0)
    t0 = time.time()
    model = load_model()
    ds = build_dataset(0)
    train_images = unique_training_images(ds.images)
    labels = {p["text"]: p for p in bench["prompts"]}
    prompts = [p for p in eval_prompts(ds, per_kind=100) if labels[p.text]["positive"] and p.scene is not None][:24]
    negatives = np.array([p["steps1_gen1"] for p in bench["prompts"] if not p["positive"]])
    # what a faithful non-copy scores: ordinary training captions sampled the same way (none of them copies)
    ordinary = [p for p in eval_prompts(ds, per_kind=100) if p.kind == "ordinary"][:24]
    texts = [p.text for p in ordinary for _ in SEEDS]
    x = initial_noise(model, model.latent_shape(), list(SEEDS) * len(ordinary), model.device)
    plain = sample(model, model.encode(texts), model.encode([""]), x, MITIGATION_STEPS, monitor=False)
    reference = float(alignment(model.decode(plain.latents).numpy(), [p.scene for p in ordinary for _ in SEEDS]).mean())
    print(f"alignment of ordinary captions (no copies): {reference:.2f}")
    rows = {}
    for name, settings in mitigation_settings(negatives).items():
        rows[name] = mitigation_bench(model, prompts, train_images, settings)
        r = rows[name]
        print(f"{name:24s} copy {r['copy_rate_before']:.2f} -> {r['copy_rate_after']:.2f}, alignment "
              f"{r['alignment_before']:.2f} -> {r['alignment_after']:.2f}, time {r['time_ratio']:.2f}x, "
              f"model calls {r['model_call_ratio']:.2f}x", flush=True)
    args.json.write_text(json.dumps({"labels_from": str(args.labels), "default": DEFAULT_MITIGATION,
                                     "host_default": HOST_MITIGATION, "ordinary_alignment": reference,
                                     "seconds": round(time.time() - t0, 1), "mitigation": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
