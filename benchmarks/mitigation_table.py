"""The mitigation tables of `bench` on their own, with the labels of an earlier bench run on the same model.

    .venv/bin/python benchmarks/mitigation_table.py --labels benchmarks/bench_detection.json --json benchmarks/mitigation_table.json
    .venv/bin/python benchmarks/mitigation_table.py --model memoguard/assets/tiny-ldm \
        --labels benchmarks/bench_detection_ldm.json --json benchmarks/mitigation_table_ldm.json

Same prompts, seeds, 20 DDIM steps, targets, auto-mode threshold and side-by-side timing as
`python -m memoguard bench` (memoguard.cli.bench.mitigation_tables), without re-running its labelling,
detection and explanation parts. `--labels` may come from `bench --detection-only`. `--rows` measures only the named rows (a new strategy's).
"""
import json
import time

from memoguard.cli.bench import DEFAULT_MITIGATION, HOST_MITIGATION, labelled_run, mitigation_tables


def main() -> None:
    t0 = time.time()
    rows = lambda ap: ap.add_argument("--rows", nargs="+", default=None, help="only these rows of the table")
    args, model, evalset, prompts, positive, first_step, _ = labelled_run(__doc__.splitlines()[0], add_arguments=rows)
    res = mitigation_tables(model, evalset, prompts, positive, first_step, quick=False, rows=args.rows)
    args.json.write_text(json.dumps({"labels_from": str(args.labels), "model": model.name,
                                     "evaluation_set": evalset.name, "default": DEFAULT_MITIGATION,
                                     "host_default": HOST_MITIGATION, "seconds": round(time.time() - t0, 1), **res},
                                    indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
