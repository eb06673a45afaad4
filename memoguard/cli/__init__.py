"""python -m memoguard {demo,generate,scan,bench,calibrate,index,audit,table,train-filter-demo} ...

Each sub-command lives in its own module with `add_arguments(parser)` and `run(args) -> int`;
this file only routes. Heavy imports (diffusers) happen inside the commands.
"""
import argparse
import importlib
import sys

COMMANDS = {
    "demo": ("memoguard.cli.demo", "sample a few prompts on the bundled model and write an HTML report"),
    "generate": ("memoguard.cli.generate", "sample prompts with the score, verdict and optional mitigation into PNGs"),
    "scan": ("memoguard.cli.scan", "score prompts (one, or a txt/CSV/JSONL file) at the first step"),
    "bench": ("memoguard.cli.bench", "measure detection, explanation, mitigation and overhead on the bundled model"),
    "calibrate": ("memoguard.cli.calibrate", "score benign prompts on a model and save a calibration file"),
    "audit": ("memoguard.cli.audit", "the fine-tuner's audit: a dataset's captions by recall (with and without a LoRA), "
                                     "with the generations' nearest training images, as an HTML report"),
    "index": ("memoguard.cli.index", "index a folder of training images: nearest-image copy evidence, near-duplicates"),
    "table": ("memoguard.cli.table", "the paper's detection table (AUC, TPR@1%FPR) for two prompt files on a model"),
    "train-filter-demo": ("memoguard.cli.filter_demo", "train with and without the memorization filter and compare"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memoguard", description="MemoGuard: memorization in diffusion models")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text)  # help is %-formatted
        p.set_defaults(module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv=None) -> int:
    from ..errors import MemoGuardError
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(args.module).run(args)
    except MemoGuardError as e:  # bad model path, corrupt weights or calibration, bad prompt file ...
        print(f"memoguard {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
