"""The mitigation tables of `bench` on their own, with the labels of an earlier bench run on the same model.

    .venv/bin/python benchmarks/mitigation_table.py --labels benchmarks/bench_full.json --json benchmarks/mitigation_table.json
    .venv/bin/python benchmarks/mitigation_table.py --model memoguard/assets/tiny-ldm \
        --labels benchmarks/bench_detection_ldm.json --json benchmarks/mitigation_table_ldm.json

Same prompts, seeds, 20 DDIM steps, targets, auto-mode threshold and side-by-side timing as
`python -m memoguard bench` (memoguard.cli.bench.mitigation_tables), without re-running its labelling,
detection and explanation parts. `--labels` may come from `bench --detection-only`.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from memoguard.cli.bench import DEFAULT_MITIGATION, HOST_MITIGATION, mitigation_tables
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
        raise SystemExit("--labels must come from a full bench run (the table uses all its prompts)")
    torch.manual_seed(0)
    t0 = time.time()
    model = load_model(args.model)
    evalset = eval_set_for(model)
    if bench.get("evaluation_set", "shapes") != evalset.name:
        raise SystemExit(f"--labels were measured on the {bench.get('evaluation_set')!r} set, the model is {evalset.name!r}")
    prompts = evalset.prompts(per_kind=100)
    labels = {p["text"]: p for p in bench["prompts"]}
    positive = np.array([labels[p.text]["positive"] for p in prompts])
    first_step = np.array([labels[p.text]["steps1_gen1"] for p in prompts])
    res = mitigation_tables(model, evalset, prompts, positive, first_step, quick=False)
    args.json.write_text(json.dumps({"labels_from": str(args.labels), "model": model.name,
                                     "evaluation_set": evalset.name, "default": DEFAULT_MITIGATION,
                                     "host_default": HOST_MITIGATION, "seconds": round(time.time() - t0, 1), **res},
                                    indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
