"""The explanation tables of `bench` on their own, with the labels of an earlier bench run on the same model.

    .venv/bin/python benchmarks/explanation_table.py --labels benchmarks/bench_detection.json --json benchmarks/explanation_table.json
    .venv/bin/python benchmarks/explanation_table.py --model memoguard/assets/tiny-ldm \\
        --labels benchmarks/bench_detection_ldm.json --json benchmarks/explanation_table_ldm.json

The deletion test of `python -m memoguard bench` (memoguard.cli.bench.explanation_tables): every method's word
order against exact leave-one-out and a random order, on the duplicated captions, the other positives and long
prompts (a memorized caption followed by ordinary ones up to 75 tokens), without re-running the labelling.
The flag threshold is the negatives' 1 % of the first-step score averaged over the 4 seeds, as in bench.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from memoguard.cli.bench import SEEDS, explanation_tables
from memoguard.measure import first_step_gaps
from memoguard.standalone.diffusers_model import load_model
from memoguard.tiny.evalsets import eval_set_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", type=Path, required=True, help="a full `bench --json` result (its prompts and labels)")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=None, help="the evaluation model the labels come from (default: bundled)")
    args = ap.parse_args()
    bench = json.loads(args.labels.read_text())
    if bench.get("quick"):
        raise SystemExit("--labels must come from a full bench run (50-step labels)")
    torch.manual_seed(0)
    t0 = time.time()
    model = load_model(args.model)
    evalset = eval_set_for(model)
    if bench.get("evaluation_set", "shapes") != evalset.name:
        raise SystemExit(f"--labels were measured on the {bench.get('evaluation_set')!r} set, the model is {evalset.name!r}")
    labels = {p["text"]: p for p in bench["prompts"]}
    prompts = evalset.prompts(per_kind=100)
    texts = [p.text for p in prompts]
    kinds = np.array([p.kind for p in prompts])
    positive = np.array([labels[t]["positive"] for t in texts])
    steps = bench["label_steps"]
    scores = first_step_gaps(model, texts, SEEDS, model.latent_shape(), model.timesteps(steps)[0], 128).mean(1)
    res = explanation_tables(model, texts, kinds, positive, scores, steps, quick=False)
    for group, found in res.items():
        print(f"{group}: {found.get('flagged_before', 0)} of {found['n']} flagged, {found.get('spread', 0)} spread")
        for name, m in found.get("methods", {}).items():
            print(f"  {name:26s} top word ends the flag {m['top1_ends_flag']:.2f}, agrees with exact "
                  f"{m['top1_agrees_with_exact']:.2f}, deletion AUC {m['deletion_auc']:.3f}, "
                  f"evaluations/step {m['evaluations_per_step']}")
    args.json.write_text(json.dumps({"labels_from": str(args.labels), "model": model.name,
                                     "evaluation_set": evalset.name, "seconds": round(time.time() - t0, 1),
                                     "explanation": res}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
