"""`python -m memoguard scan`: first-step scores for one prompt or a file of prompts.

Input: --prompt TEXT, or --file F as .txt (one prompt a line), .csv (a `prompt` column and an
optional `label` column) or .jsonl ({"prompt": ..., "label": ...}). Labels are 1/0 or
true/false (1 = memorized). Output: a table on stdout, and --out F.csv / F.json.
"""
import csv
import json
import math
import sys
from pathlib import Path


from ..calibration import Calibration, CalibrationError, CalibrationStore, default_store_folder, roc_auc, tpr_at_fpr
from ..errors import MemoGuardError
from ..standalone.pipeline import DEFAULT_STEPS, first_step_scores

_TRUE, _FALSE = {"1", "true", "yes", "memorized"}, {"0", "false", "no", ""}


class PromptFileError(MemoGuardError, ValueError):
    pass


def _label(value, where: str):
    text = str(value).strip().lower()
    if text in _TRUE:
        return 1
    if text in _FALSE:
        return 0 if text else None
    raise PromptFileError(f"{where}: label {value!r} is not 1/0/true/false")


def read_prompts(path: Path):
    """[(prompt, label or None)] from a txt, CSV or JSONL file, with clear errors."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptFileError(f"prompt file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PromptFileError(f"cannot read prompt file {path}: {e}") from None
    suffix = Path(path).suffix.lower()
    rows = []
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise PromptFileError(f"{path}: a CSV needs a 'prompt' column (has: {reader.fieldnames})")
        for i, row in enumerate(reader, start=2):
            rows.append((row["prompt"] or "", _label(row.get("label", ""), f"{path}:{i}")))
    elif suffix in (".jsonl", ".ndjson"):
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{path}:{i}: not JSON: {e}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise PromptFileError(f"{path}:{i}: each line needs a string field 'prompt'")
            rows.append((obj["prompt"], _label(obj.get("label", ""), f"{path}:{i}")))
    else:
        rows = [(line.strip(), None) for line in text.splitlines() if line.strip()]
    if not rows:
        raise PromptFileError(f"{path}: no prompts found")
    return rows


def load_calibration(path, model, steps: int):
    """The model's calibration (from `path`, else the default store or the bundled preset) at the noise level
    of the first step of a `steps` schedule, and notes on how this run differs from it; (None, []) if none."""
    key = model.model_key
    if path is not None:
        calibration = Calibration.find(path, key)
        if calibration is None:
            raise CalibrationError(f"{path} has no calibration for this model ({model.name}, key {key}); "
                                   f"run `memoguard calibrate --model ...` on it")
    else:
        calibration = CalibrationStore(default_store_folder()).find(key)
    if calibration is None:
        return None, []
    level = model.noise_level(model.timesteps(steps)[0])
    calibration = calibration.at_noise_level(level)
    return calibration, calibration.check(model.parameterization, level, model.latent_shape())


def add_arguments(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--file", type=Path, help="prompts as .txt, .csv (prompt[,label]) or .jsonl")
    p.add_argument("--model", type=Path, default=None, help="diffusers folder or .safetensors/.ckpt (default: bundled tiny model)")
    p.add_argument("--prediction", choices=("auto", "eps", "v"), default="auto",
                   help="a checkpoint file's prediction type; auto: see memoguard.standalone.checkpoints (default auto)")
    p.add_argument("--calibration", type=Path, default=None,
                   help="calibration JSON (default: the model's own in the calibration folder, or the bundled preset)")
    p.add_argument("--fpr", type=float, default=0.01, help="false-positive rate that sets the threshold (default 0.01)")
    p.add_argument("--seeds", type=int, default=1, help="generations per prompt (scores are averaged)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="schedule whose first timestep is scored")
    p.add_argument("--explain", type=int, default=3, metavar="K", help="show the top K tokens (0: skip, faster)")
    p.add_argument("--out", type=Path, default=None, help="write results to .csv or .json")


def scan(model, rows, calibration, fpr=0.01, seeds=1, steps=DEFAULT_STEPS, explain=3):
    from ..explain import token_contributions
    from ..sampling import initial_noise
    prompts = [p for p, _ in rows]
    scores = first_step_scores(model, prompts, list(range(seeds)), steps).mean(1)
    threshold = calibration.threshold(fpr) if calibration else float("nan")
    uncond = model.encode([""])
    results = []
    for (prompt, label), score in zip(rows, scores):
        top, method = [], None
        if explain and prompt.strip():
            x = initial_noise(model, model.latent_shape(), list(range(seeds)), model.device)
            contrib = token_contributions(model, model.encode([prompt]), uncond, x, total_steps=steps)[0]
            top, method = [(tok, round(share, 4)) for tok, share in contrib.top(explain)], contrib.method_name
        results.append({
            "prompt": prompt, "label": label, "score": float(score),
            "percentile": calibration.percentile(float(score)) if calibration else float("nan"),
            "flagged": bool(calibration) and bool(score >= threshold), "threshold": threshold, "top_tokens": top,
            "explanation_method": method,
        })
    summary = {"n": len(results), "threshold": threshold, "fpr": fpr, "calibration": calibration.model_key if calibration else None}
    labelled = [r for r in results if r["label"] is not None]
    pos = [r["score"] for r in labelled if r["label"] == 1]
    neg = [r["score"] for r in labelled if r["label"] == 0]
    if pos and neg:
        summary.update(auc=roc_auc(pos, neg), tpr_at_1pct_fpr=tpr_at_fpr(pos, neg, 0.01), positives=len(pos), negatives=len(neg))
    return results, summary


def _fmt(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.4f}"


def run(args) -> int:
    from ..standalone.diffusers_model import ModelLoadError, load_model
    try:
        rows = [(args.prompt, None)] if args.prompt is not None else read_prompts(args.file)
        model = load_model(args.model, prediction=args.prediction)
        calibration, notes = load_calibration(args.calibration, model, args.steps)
    except (PromptFileError, CalibrationError, ModelLoadError) as e:
        print(f"memoguard scan: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if not rows[0][0].strip() and len(rows) == 1:
        print("note: the empty prompt is the unconditional prompt itself: its score is 0 by definition", file=sys.stderr)
    if calibration is None:
        print(f"note: no calibration for {model.name} (key {model.model_key}): scores only, uncalibrated "
              f"(run `memoguard calibrate --model ...` first)", file=sys.stderr)
    results, summary = scan(model, rows, calibration, args.fpr, args.seeds, args.steps, args.explain)
    methods = sorted({r["explanation_method"] for r in results if r["explanation_method"]})
    if methods:
        print(f"top tokens by {', '.join(methods)}", file=sys.stderr)
    for r in results:
        flag = "FLAG" if r["flagged"] else "ok  " if calibration else "unc."
        top = ", ".join(f"{t} {100 * s:.0f}%" for t, s in r["top_tokens"])
        print(f"{flag} {_fmt(r['score'])} p{_fmt(r['percentile'])[:5]:>6}  {r['prompt'][:70]!s:70}  {top}")
    if "auc" in summary:
        print(f"AUC {summary['auc']:.3f}  TPR@1%FPR {summary['tpr_at_1pct_fpr']:.3f}  "
              f"({summary['positives']} positives, {summary['negatives']} negatives)")
    if args.out:
        write_results(args.out, results, summary)
    return 0


def write_results(path: Path, results, summary) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps({"summary": summary, "results": results}, indent=1))
        return
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "label", "score", "percentile", "flagged", "top_tokens"])
        for r in results:
            w.writerow([r["prompt"], "" if r["label"] is None else r["label"], f"{r['score']:.6f}",
                        f"{r['percentile']:.2f}", int(r["flagged"]), " ".join(f"{t}:{s}" for t, s in r["top_tokens"])])
