"""`python -m memoguard calibrate`: benign scores on a model -> a calibration file entry.

For a user's own model the shipped benign list (assets/benign_prompts.txt) is the default. The
bundled tiny model only knows its own small vocabulary, so `--tiny-benign` calibrates it on
ordinary captions of its own kind (fresh combinations and another style, none in the bench).
"""
import sys
from pathlib import Path

from .calibration import Calibration, CalibrationError, default_benign_prompts
from .pipeline import DEFAULT_STEPS, first_step_scores
from .scan import BUNDLED_KEY, PromptFileError, read_prompts


def tiny_benign_prompts(n: int = 300, seed: int = 99):
    import numpy as np
    from .tiny.data import build_dataset
    ds = build_dataset(0)
    rng = np.random.default_rng(seed)
    scenes = ds.ordinary_train_scenes + ds.novel_scenes
    picked = [scenes[i] for i in rng.choice(len(scenes), n, replace=False)]
    return [s.caption() if i % 3 else s.caption_other_style() for i, s in enumerate(picked)]


def add_arguments(p):
    p.add_argument("--model", type=Path, default=None, help="diffusers pipeline folder (default: bundled tiny model)")
    p.add_argument("--prompts", type=Path, default=None, help="benign prompts (.txt/.csv/.jsonl); default: shipped list")
    p.add_argument("--tiny-benign", action="store_true", help="use ordinary captions of the bundled model's kind")
    p.add_argument("--seeds", type=int, default=1, help="generations per prompt")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="schedule whose first timestep is scored")
    p.add_argument("--out", type=Path, required=True, help="calibration JSON to create or update")
    p.add_argument("--key", default=None, help="model key in the file (default: the model folder's name)")


def run(args) -> int:
    from .diffusers_model import load_model
    try:
        prompts = (tiny_benign_prompts() if args.tiny_benign
                   else [p for p, _ in read_prompts(args.prompts)] if args.prompts else default_benign_prompts())
        model = load_model(args.model)
    except PromptFileError as e:
        print(f"memoguard calibrate: {e}", file=sys.stderr)
        return 2
    key = args.key or (BUNDLED_KEY if args.model is None else model.name)
    scores = first_step_scores(model, prompts, list(range(args.seeds)), args.steps).mean(1)
    try:
        cal = Calibration(key, scores.tolist(), meta={"steps": args.steps, "seeds": args.seeds, "prompts": len(prompts)})
    except CalibrationError as e:
        print(f"memoguard calibrate: {e}", file=sys.stderr)
        return 2
    cal.save(args.out)
    print(f"{key}: {len(cal.scores)} benign scores, median {cal.scores[len(cal.scores) // 2]:.4f}, "
          f"threshold at 1% FPR {cal.threshold(0.01):.4f} -> {args.out}")
    return 0
