"""`python -m memoguard generate`: sample prompts on your own weights, with the score, the verdict and
(optionally) a mitigation, from the command line.

Each image is a PNG in --out whose text chunks hold the prompt, seed, settings, score, verdict and
mitigation record (key "memoguard", JSON); DIR/results.jsonl gets the same record, one line per
image, appended as each prompt finishes. Compare strategies by running the same prompts and seeds
with --mitigation off, then each strategy.
"""
import json
import sys
import time
from pathlib import Path

from ..calibration_lookup import run_detector
from ..errors import ArgumentError
from ..mitigate import (DEFAULT_DELAY, DEFAULT_EARLY_SCALE, DEFAULT_NOISE_CANDIDATES, DEFAULT_PAD_SHARE, MODES,
                        OPPOSITE_DELAY, SCHEDULES, STRATEGIES, extra_cost, mitigate)
from ..standalone.pipeline import DEFAULT_STEPS

MITIGATIONS = ("off", "default", *STRATEGIES)


def _seeds(text: str):
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ArgumentError(f"--seeds takes integers separated by commas, like 0,1,2,3 (got {text!r})") from None
    if not seeds or any(s < 0 for s in seeds):
        raise ArgumentError(f"--seeds needs at least one non-negative integer (got {text!r})")
    return seeds


def add_arguments(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--file", type=Path, help="prompts as .txt, .csv (prompt[,label]) or .jsonl, as for scan")
    p.add_argument("--model", type=Path, default=None,
                   help="diffusers folder or .safetensors/.ckpt (default: the bundled tiny model)")
    p.add_argument("--prediction", choices=("auto", "eps", "v"), default="auto",
                   help="a checkpoint file's prediction type; auto: see memoguard.standalone.checkpoints (default auto)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, one image each (default 0)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"DDIM steps (default {DEFAULT_STEPS})")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's own; 7.5 for SD)")
    p.add_argument("--mitigation", choices=MITIGATIONS, default="off",
                   help="off; default (padding masking, the best measured on the evaluation models; token "
                        "removal where no CLIP chunk feeds the model: Flux, Chroma, Qwen-Image); or a strategy")
    p.add_argument("--mode", choices=MODES[1:], default=None,
                   help="auto: mitigate only flagged images (needs a calibration); always: every image "
                        "(default: auto with a calibration, always without)")
    p.add_argument("--target", type=float, default=None,
                   help="first-step score to bring images under (default: the calibration's benign median)")
    p.add_argument("--max-removals", type=int, default=3, help="remove_tokens: most tokens left out (default 3)")
    p.add_argument("--delay", type=float, default=None,
                   help=f"guidance_delay / opposite_guidance: share of the first steps at the early scale "
                        f"(default {DEFAULT_DELAY} / {OPPOSITE_DELAY})")
    p.add_argument("--early-scale", type=float, default=DEFAULT_EARLY_SCALE,
                   help=f"opposite_guidance: guidance scale of those steps, <= 0 (default {DEFAULT_EARLY_SCALE})")
    p.add_argument("--noise-candidates", type=int, default=DEFAULT_NOISE_CANDIDATES,
                   help=f"new_noise: most fresh noises tried per image (default {DEFAULT_NOISE_CANDIDATES})")
    p.add_argument("--pad-share", type=float, default=DEFAULT_PAD_SHARE,
                   help=f"mask_padding: share of the padding positions zeroed, nearest the end-of-text first "
                        f"(default {DEFAULT_PAD_SHARE:g})")
    p.add_argument("--lr", type=float, default=0.05,
                   help="minimize / optimize_noise: AdamW / Adam step size (default 0.05)")
    p.add_argument("--max-iters", type=int, default=10,
                   help="minimize / optimize_noise: most AdamW / Adam steps (default 10)")
    p.add_argument("--calibration", type=Path, default=None,
                   help="calibration JSON (default: the model's own in the calibration folder, or the bundled preset)")
    p.add_argument("--fpr", type=float, default=0.01, help="false-positive rate that sets the threshold (default 0.01)")
    p.add_argument("--training-images", type=Path, default=None, metavar="DIR",
                   help="a folder of training images: each image's nearest one, its similarity and the copy verdict "
                        "(memoguard index DIR indexes it; the index is brought up to date first)")
    p.add_argument("--index-cache", type=Path, default=None,
                   help="with --training-images: folder of cached indexes (default as for memoguard index)")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs and results.jsonl")


def mitigation_settings(args, calibration):
    """(strategy or None, keyword arguments of memoguard.mitigate.mitigate) from the command line."""
    if args.mitigation == "off":
        return None, {}
    threshold = calibration.threshold(args.fpr) if calibration else None
    mode = args.mode or ("auto" if threshold is not None else "always")
    if mode == "auto" and threshold is None:
        raise ArgumentError("--mode auto mitigates flagged images only, which needs a calibration of this model "
                            "(python -m memoguard calibrate --model PATH)")
    target = args.target if args.target is not None else (calibration.median if calibration else None)
    strategy = "auto" if args.mitigation == "default" else args.mitigation
    if target is None and strategy not in SCHEDULES:
        raise ArgumentError("mitigation needs a target score: give --target, or calibrate this model so that its "
                            "benign median serves (python -m memoguard calibrate --model PATH)")
    return strategy, dict(mode=mode, threshold=threshold, target=target or 0.0, lr=args.lr, max_iters=args.max_iters,
                          max_removals=args.max_removals, delay=args.delay, early_scale=args.early_scale,
                          noise_candidates=args.noise_candidates, pad_share=args.pad_share,
                          detector=run_detector(calibration))


def _json_safe(value):
    """NaN (no percentile without a calibration, ...) as null, so that results.jsonl is strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def verdict_score(record: dict) -> str:
    score = record["verdict"]["score"]
    return "unavailable" if score is None else f"{score:.4f}"


def png_text(record: dict):
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("parameters", f"{record['prompt']}\nSteps: {record['steps']}, CFG scale: {record['guidance']}, "
                                f"Seed: {record['seed']}, MemoGuard: {record['verdict']['label']} "
                                f"{verdict_score(record)}")
    info.add_text("memoguard", json.dumps(record))
    return info


def run(args) -> int:
    import numpy as np
    from PIL import Image

    from ..standalone.diffusers_model import load_model
    from .lib.inputs import load_calibration, read_prompts
    from ..sampling import initial_noise, sample
    from ..hosts import failure_message, is_out_of_memory, release_memory
    from ..verdict import verdict_for
    if args.steps < 1:
        raise ArgumentError(f"--steps must be >= 1 (got {args.steps})")
    seeds = _seeds(args.seeds)
    prompts = [args.prompt] if args.prompt is not None else [p for p, _ in read_prompts(args.file)]
    model = load_model(args.model, prediction=args.prediction)
    guidance = model.guidance if args.guidance is None else args.guidance
    calibration, notes = load_calibration(args.calibration, model, args.steps)
    strategy, settings = mitigation_settings(args, calibration)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if calibration is None:
        print(f"note: no calibration for {model.name} (key {model.model_key}): scores only, uncalibrated", file=sys.stderr)
    index = None
    if args.training_images is not None:
        from .index import open_index
        index = open_index(args.training_images, args.index_cache)
        if index.copy_threshold(model.model_key) is None:
            print(f"note: {args.training_images} has no copy threshold for {model.name}: nearest images without a "
                  f"verdict (memoguard index {args.training_images} --calibrate --model ...)", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    uncond, ts = model.encode([""]), model.timesteps(args.steps)
    results = args.out / "results.jsonl"
    t0 = time.time()
    for k, prompt in enumerate(prompts):
        cond = model.encode([prompt]).repeat_rows(len(seeds))
        x = initial_noise(model, model.latent_shape(), seeds, model.device)
        plan, failure = None, None
        if strategy is not None:
            try:
                plan = mitigate(model, cond, uncond, x, ts, guidance, strategy=strategy, seeds=seeds,
                                noise_of=lambda s: initial_noise(model, model.latent_shape(), s, model.device),
                                **settings)
                cond = plan.cond
                x = x if plan.x_T is None else plan.x_T
            except Exception as e:  # out of memory: the images are still made, with the plain prompt
                if not is_out_of_memory(e):
                    raise
                failure = failure_message("mitigating", e)
                release_memory(e)
                print(failure, file=sys.stderr)
        run_ = sample(model, cond, uncond, x, args.steps, guidance if plan is None or plan.guidance is None
                      else plan.guidance, detector=run_detector(calibration))
        verdicts = verdict_for(run_.trace, calibration, fpr=args.fpr, images=len(seeds), notes=notes)
        images = (model.decode(run_.latents).numpy() * 255).round().astype(np.uint8)
        matches = index.nearest(images, model.model_key) if index is not None else [None] * len(images)
        lines = []
        for g, (seed, verdict, image, match) in enumerate(zip(seeds, verdicts, images, matches)):
            record = {"prompt": prompt, "seed": seed, "steps": args.steps, "guidance": guidance,
                      "model": model.name, "model_key": model.model_key, "verdict": _json_safe(verdict.to_dict()),
                      "scores": run_.trace.per_step()[:, g].tolist(),
                      "mitigation": None if failure is None else {"strategy": strategy, "ran": False, "error": failure},
                      "file": f"{k:04d}_seed{seed}.png"}
            if plan is not None:
                rec = plan.record
                record["mitigation"] = {
                    "strategy": rec.strategy, "mode": rec.mode, "ran": rec.ran, "summary": rec.summary(g),
                    "before": rec.before[g], "after": rec.after[g], "removed": rec.removed[g] if rec.removed else [],
                    "delay_steps": rec.delay_steps if rec.ran else 0, "early_scale": rec.early_scale,
                    "noise_seed": rec.seeds[g], "padding_masked": rec.masked[g], "reason": rec.reason,
                    "prompt_used": " ".join(cond.prompt_tokens(g)), "cost_ratio": extra_cost(rec, args.steps)}
            if match is not None:
                record["nearest_training_image"] = match.to_dict()
            Image.fromarray(image).save(args.out / record["file"], pnginfo=png_text(record))
            lines.append(json.dumps(record, allow_nan=False))
            line = f"[{k + 1}/{len(prompts)}] seed {seed}: {verdict.summary()}"
            if plan is not None:
                line += f"\n    {record['mitigation']['summary']}"
            if match is not None:
                line += f"\n    {match.summary()}"
            print(line)
        with results.open("a", encoding="utf-8") as f:  # a finished prompt is never lost
            f.write("\n".join(lines) + "\n")
    print(f"wrote {len(prompts) * len(seeds)} images and {results} in {time.time() - t0:.0f} s")
    return 0
