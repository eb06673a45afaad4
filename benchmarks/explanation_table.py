"""The explanation tables of `bench` on their own, with the labels of an earlier bench run on the same model.

    .venv/bin/python benchmarks/explanation_table.py --labels benchmarks/bench_detection.json --json benchmarks/explanation_table.json
    .venv/bin/python benchmarks/explanation_table.py --model memoguard/assets/tiny-ldm \
        --labels benchmarks/bench_detection_ldm.json --json benchmarks/explanation_table_ldm.json

The deletion test of `python -m memoguard bench` (memoguard.cli.bench.explanation_tables): every method's word
order against exact leave-one-out and a random order, on the duplicated captions, the other positives and long
prompts (a memorized caption followed by ordinary ones up to 75 tokens), without re-running the labelling.
The flag threshold is the negatives' 1 % of the first-step score averaged over the 4 seeds, as in bench.
"""
import json
import time

import numpy as np

from memoguard.cli.bench import SEEDS, explanation_tables, labelled_run
from memoguard.measure import first_step_gaps


def main() -> None:
    t0 = time.time()
    args, model, evalset, prompts, positive, _, labels = labelled_run(__doc__.splitlines()[0])
    texts = [p.text for p in prompts]
    steps = labels["label_steps"]
    scores = first_step_gaps(model, texts, SEEDS, model.latent_shape(), model.timesteps(steps)[0], 128).mean(1)
    res = explanation_tables(model, texts, np.array([p.kind for p in prompts]), positive, scores, steps, quick=False)
    for group, found in res.items():
        print(f"{group}: {found.get('flagged_before', 0)} of {found['n']} flagged, {found.get('spread', 0)} spread")
        for name, m in found.get("methods", {}).items():
            print(f"  {name:26s} top word ends the flag {m['top1_ends_flag']:.2f}, agrees with exact "
                  f"{m['top1_agrees_with_exact_all']:.2f}, deletion AUC {m['deletion_auc']:.3f}, "
                  f"evaluations/step {m['evaluations_per_step']}")
    args.json.write_text(json.dumps({"labels_from": str(args.labels), "model": model.name,
                                     "evaluation_set": evalset.name, "seconds": round(time.time() - t0, 1),
                                     "explanation": res}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
