"""`python -m memoguard table`: the paper's detection table (Wen et al. 2024, Table 1) on your own weights.

Two prompt files (memorized / not memorized; e.g. public lists the user downloads) are scored three ways:
the first step of 1 generation, the first step averaged over 4 generations, and the first 10 steps averaged
over 4 generations; each with ROC AUC and the true-positive rate at 1 % false positives. Batched and
resumable like `scan`: --out F.jsonl holds each prompt's per-step gaps as it is done.
"""
from pathlib import Path

import numpy as np

from ..calibration import roc_auc, tpr_at_fpr
from ..errors import MemoGuardError
from .lib.inputs import DTYPES, check_dtype, read_prompts
from .lib.jobs import Progress, keep_batches, results_so_far

GENERATIONS = 4
WINDOW = 10
ROWS = (("steps1_gen1", "first step, 1 generation"), ("steps1_gen4", f"first step, {GENERATIONS} generations"),
        ("steps10_gen4", f"first {WINDOW} steps, {GENERATIONS} generations"))


def add_arguments(p):
    p.add_argument("--memorized", type=Path, required=True, help="prompts known to be memorized (.txt/.csv/.jsonl)")
    p.add_argument("--other", type=Path, required=True, help="prompts that are not (.txt/.csv/.jsonl)")
    p.add_argument("--model", type=Path, default=None, help="diffusers folder or .safetensors/.ckpt (default: bundled)")
    p.add_argument("--prediction", choices=("auto", "eps", "v"), default="auto", help="a checkpoint's prediction type")
    p.add_argument("--steps", type=int, default=50, help=f"the schedule whose first {WINDOW} steps are scored")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale between the scored steps (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch (x 4 generations)")
    p.add_argument("--out", type=Path, default=None, help="append each prompt's gaps to this .jsonl (resumable)")
    p.add_argument("--resume", action="store_true", help="skip the prompts --out already holds")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="fp16/bf16 on a GPU")


def table(records) -> dict:
    """{row: {auc, tpr_at_1pct_fpr}} from records holding `label` and `gaps` (generations x steps)."""
    gaps = np.array([r["gaps"] for r in records], dtype=float)
    labels = np.array([r["label"] for r in records]) == 1
    scores = {"steps1_gen1": gaps[:, 0, 0], "steps1_gen4": gaps[:, :, 0].mean(1),
              "steps10_gen4": gaps[:, :, :WINDOW].mean((1, 2))}
    return {k: {"auc": roc_auc(v[labels], v[~labels]), "tpr_at_1pct_fpr": tpr_at_fpr(v[labels], v[~labels], 0.01)}
            for k, v in scores.items()}


def run(args) -> int:
    from ..sampling import initial_noise, sample
    from ..standalone.diffusers_model import load_model
    if args.steps < WINDOW:
        raise MemoGuardError(f"--steps must be at least {WINDOW} (the table averages the first {WINDOW})")
    if args.batch_size < 1:
        raise MemoGuardError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.resume and args.out is None:
        raise MemoGuardError("--resume needs --out F.jsonl")
    check_dtype(args.device, args.dtype)
    rows = [(p, 1) for p, _ in read_prompts(args.memorized)] + [(p, 0) for p, _ in read_prompts(args.other)]
    done = results_so_far(args.out, rows, args.resume)
    model = load_model(args.model, device=args.device, dtype=DTYPES[args.dtype], prediction=args.prediction)
    guidance = model.guidance if args.guidance is None else args.guidance
    first = model.timesteps(args.steps)[:WINDOW]  # the rest of the schedule is never needed
    uncond = model.encode([""])
    x = initial_noise(model, model.latent_shape(), list(range(GENERATIONS)), model.device)
    skip = {r["index"] for r in done}
    todo = [(i, p, label) for i, (p, label) in enumerate(rows) if i not in skip]

    def gaps(rows, cond):
        trace = sample(model, cond.repeat_rows(GENERATIONS), uncond, x.repeat(len(rows), 1, 1, 1),
                       guidance=guidance, timesteps=first).trace
        return trace.per_step().T.reshape(len(rows), GENERATIONS, WINDOW).tolist()

    def batches():
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            found = model.per_prompt([p for _, p, _ in batch], gaps)
            yield [{"index": i, "prompt": p, "label": label, "gaps": g} for (i, p, label), g in zip(batch, found)]

    new, code = keep_batches(batches(), args.out, Progress(len(rows), len(done)), len(todo), "memoguard table",
                             "this run")
    if code is not None:
        return code
    records = done + new
    result = table(records)
    positives = sum(r["label"] for r in records)
    print(f"{model.name}: {positives} memorized, {len(records) - positives} other prompts; DDIM {args.steps} steps, "
          f"guidance {guidance:g}")
    print(f"{'':34} {'AUC':>6} {'TPR@1%FPR':>10}")
    for key, name in ROWS:
        print(f"{name:34} {result[key]['auc']:6.3f} {result[key]['tpr_at_1pct_fpr']:10.3f}")
    return 0
