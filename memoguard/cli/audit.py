"""`python -m memoguard audit --dataset DIR [--model M] [--lora L] --out report.html`: the fine-tuner's audit.

Scores every caption of the dataset folder (memoguard.audit) on the model and, with --lora, on the model with the
LoRA (the change is what the LoRA added), ranks them, samples --images images of the --top captions (with the LoRA)
and finds each one's nearest training image. Writes report.html and report.jsonl beside it (one line per caption as
each batch is scored; --resume skips the captions already there).
"""
import json
import sys
from pathlib import Path

from ..errors import ArgumentError
from ..standalone.pipeline import DEFAULT_STEPS


def add_arguments(p):
    p.add_argument("--dataset", type=Path, required=True, help="the training folder (images and .txt captions)")
    p.add_argument("--model", type=Path, default=None,
                   help="the base model: diffusers folder or .safetensors/.ckpt (default: the bundled tiny model)")
    p.add_argument("--lora", type=Path, default=None,
                   help="a LoRA file (diffusers or kohya layout; needs peft): captions are scored with and without it")
    p.add_argument("--seeds", type=int, default=4, help="generations each caption's score averages (default 4)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"DDIM steps (default {DEFAULT_STEPS})")
    p.add_argument("--top", type=int, default=8, help="captions sampled for evidence, highest recall first (default 8)")
    p.add_argument("--images", type=int, default=4, help="images sampled per top caption (default 4)")
    p.add_argument("--batch-size", type=int, default=32, help="captions scored per batch (default 32)")
    p.add_argument("--calibration", type=Path, default=None,
                   help="calibration JSON of the audited model (default: its own in the calibration folder)")
    p.add_argument("--fpr", type=float, default=0.01, help="false-positive rate of the verdict (default 0.01)")
    p.add_argument("--cache", type=Path, default=None, help="folder of cached indexes (default as for memoguard index)")
    p.add_argument("--out", type=Path, required=True, help="the HTML report (its .jsonl beside it)")
    p.add_argument("--resume", action="store_true", help="keep the captions the .jsonl already holds")


def _done(lines_file: Path, resume: bool) -> dict:
    """{caption: record dict} already scored (with --resume); a cut-off last line is scored again."""
    if not lines_file.is_file():
        return {}
    if not resume:
        raise ArgumentError(f"{lines_file} exists: pass --resume to go on from it, or choose another --out")
    done, lines = {}, lines_file.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            done[record["caption"]] = record
        except (ValueError, KeyError, TypeError):
            if n < len(lines):  # only the last line can have been cut off by a run that died
                raise ArgumentError(f"{lines_file}:{n} is not an audit line") from None
    return done


def run(args) -> int:
    import numpy as np

    from ..audit import CaptionRecord, caption_files, gather_evidence, rank, write_report
    from ..calibration_lookup import run_detector
    from ..measure import first_step_gaps
    from ..standalone.diffusers_model import load_model
    from ..standalone.pipeline import generate
    from .index import open_index
    from .lib.inputs import load_calibration
    if min(args.seeds, args.steps, args.batch_size, args.images) < 1 or args.top < 0:
        raise ArgumentError("--seeds, --steps, --batch-size and --images must be >= 1, --top >= 0")
    index = open_index(args.dataset, args.cache)
    captions = caption_files(index)
    if not captions:
        raise ArgumentError(f"{args.dataset} has no captioned images (kohya-style .txt or .caption beside each image)")
    model = load_model(args.model)
    if args.lora is not None:
        from ..standalone.lora import load_lora, with_lora
        load_lora(model, args.lora)
    calibration, notes = load_calibration(args.calibration, model, args.steps)
    threshold = calibration.threshold(args.fpr) if calibration else None
    detector = run_detector(calibration)
    lines_file = args.out.with_suffix(".jsonl")
    done = _done(lines_file, args.resume)
    todo = [c for c in captions if c not in done]
    t_first = model.timesteps(args.steps)[0]
    seeds = list(range(args.seeds))
    score = lambda batch: first_step_gaps(model, batch, seeds, model.latent_shape(), t_first, detector=detector).mean(1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(todo), args.batch_size):
        batch = todo[start:start + args.batch_size]
        scores = score(batch)
        base = None
        if args.lora is not None:
            with with_lora(model, False):
                base = score(batch)
        with lines_file.open("a", encoding="utf-8") as f:
            for k, caption in enumerate(batch):
                record = CaptionRecord(caption, captions[caption], float(scores[k]),
                                       None if base is None else float(base[k]),
                                       None if threshold is None else bool(scores[k] >= threshold))
                done[caption] = record.to_dict()
                f.write(json.dumps(record.to_dict()) + "\n")
        sys.stderr.write(f"\r  scored {min(len(todo), start + len(batch))}/{len(todo)} captions")
    sys.stderr.write("\n")
    records = rank([CaptionRecord(**{k: v for k, v in d.items() if k != "added"}) for c, d in done.items()
                    if c in captions])
    evidence = []
    for record in records[:args.top]:
        images = generate(model, [record.caption], list(range(args.images)), steps=args.steps)[0][0]
        evidence.append(gather_evidence(index, record, (np.asarray(images) * 255).round().astype(np.uint8),
                                        model.model_key))
    what = f"{model.name}" + (f" + LoRA {model.lora}" if model.lora else "")
    report_notes = [f"{len(records)} captions of {args.dataset} ({len(index)} images) scored on {what}, first step of "
                    f"{args.steps} DDIM steps, {args.seeds} seeds each"] + [f"note: {n}" for n in notes]
    if calibration is None:
        report_notes.append("no calibration of the audited model: scores without verdicts (memoguard calibrate)")
    write_report(args.out, f"MemoGuard audit: {what}", records, evidence, report_notes)
    for k, r in enumerate(records[:10], 1):
        added = "" if r.added is None else f", added by the LoRA {r.added:+.4f}"
        print(f"{k:2d}. {r.score:.4f}{added}  {r.caption[:70]}")
    for e in evidence:
        print(f"   {sum(e.own)}/{len(e.own)} generations nearest to their own image: {e.caption[:60]}")
    print(f"wrote {args.out} and {lines_file}")
    return 0
