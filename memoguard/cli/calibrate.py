"""`python -m memoguard calibrate`: benign scores on a model -> a calibration, stored under the model's key.

The key is the weights fingerprint (memoguard.identity) that ComfyUI's and the WebUI's MemoGuard
compute from the weights they load, so a calibration made here is found there (copy the file into
their models/memoguard folder) and vice versa. For a user's own model the shipped benign list
(assets/benign_prompts.txt) is the default. The bundled tiny model only knows its own small
vocabulary, so `--tiny-benign` calibrates it (or the second evaluation model) on ordinary captions of
its own kind (fresh combinations and another style, none in the bench).
"""
import sys
from pathlib import Path

from ..calibration import CALIBRATION_SEEDS, CalibrationError, CalibrationStore, default_benign_prompts, default_store_folder
from ..score import DEFAULT_DETECTOR, DETECTORS, STEP_DETECTORS
from ..standalone.pipeline import DEFAULT_STEPS
from ..tiny.evalsets import eval_set_for
from .lib.inputs import PromptFileError, read_prompts


def _ints(text: str):
    return [int(v) for v in text.split(",") if v.strip()]


def add_arguments(p):
    p.add_argument("--model", type=Path, default=None, help="diffusers folder or .safetensors/.ckpt (default: bundled tiny model)")
    p.add_argument("--prediction", choices=("auto", "eps", "v"), default="auto",
                   help="a checkpoint file's prediction type; auto: see memoguard.standalone.checkpoints (default auto)")
    p.add_argument("--prompts", type=Path, default=None, help="benign prompts (.txt/.csv/.jsonl); default: shipped list")
    p.add_argument("--tiny-benign", action="store_true", help="use ordinary captions of the evaluation model's kind (the bundled model's for any other)")
    p.add_argument("--seeds", type=int, default=CALIBRATION_SEEDS,
                   help=f"seeds a prompt is scored at, each generation a benign sample (default {CALIBRATION_SEEDS})")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="DDIM schedule whose first timestep is scored")
    p.add_argument("--detector", choices=DETECTORS, default=DEFAULT_DETECTOR,
                   help=f"the first-step score the calibration holds (default {DEFAULT_DETECTOR}); runs are scored "
                        f"as their calibration's scores are; the hosts score {' or '.join(STEP_DETECTORS)}")
    p.add_argument("--extra-timesteps", type=_ints, default=[], metavar="T[,T...]",
                   help="also score the first step at these timesteps, e.g. 999 (where the hosts' k-diffusion "
                        "samplers start); 1 UNet evaluation per prompt each")
    p.add_argument("--band-prompts", type=int, default=32,
                   help="prompts sampled in full for the per-step benign band of the charts (0: no band)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale of the band runs (default: the model's)")
    p.add_argument("--band-steps", type=int, default=50,
                   help="steps of the band runs, spread over the whole schedule (t = T-1 ... 1), so that the band "
                        "covers where k-diffusion samplers start (sigma max) and where DDIM ends")
    p.add_argument("--batch-size", type=int, default=32, help="images per UNet call")
    p.add_argument("--out", type=Path, default=None,
                   help=f"calibration file to create or update (default: <key>.json in {default_store_folder()})")


def run(args) -> int:
    from ..errors import ModelLoadError
    from ..standalone.diffusers_model import load_model
    from ..measure import calibrate
    if args.detector not in STEP_DETECTORS and args.out is None:  # the folder the hosts read
        print(f"memoguard calibrate: --detector {args.detector} needs --out FILE (the calibration folder keeps one "
              f"calibration a model, of a score the hosts can give: {', '.join(STEP_DETECTORS)}); scan with "
              f"--detector {args.detector} --calibration FILE", file=sys.stderr)
        return 2
    try:
        prompts = [p for p, _ in read_prompts(args.prompts)] if args.prompts and not args.tiny_benign else None
        model = load_model(args.model, prediction=args.prediction)
        if prompts is None:
            prompts = eval_set_for(model).benign_prompts() if args.tiny_benign else default_benign_prompts()
    except (PromptFileError, ModelLoadError) as e:
        print(f"memoguard calibrate: {e}", file=sys.stderr)
        return 2

    def progress(stage, done, total):
        sys.stderr.write(f"\r  {stage}: {done}/{total} prompts")
        if done == total:
            sys.stderr.write("\n")

    try:
        cal = calibrate(model, prompts, model_key=model.model_key, shape=model.latent_shape(), steps=args.steps,
                        seeds=list(range(args.seeds)), guidance=args.guidance, band_prompts=args.band_prompts,
                        extra_timesteps=args.extra_timesteps, batch_size=args.batch_size,
                        band_timesteps=model.full_range_timesteps(args.band_steps),
                        conditions={"host": "diffusers", "prediction": model.parameterization, "model": model.name},
                        progress=progress, detector=args.detector)
        if args.out is not None:
            cal.save(args.out)
            out = args.out
        else:
            out = CalibrationStore(default_store_folder()).save(cal)
    except (CalibrationError, OSError) as e:
        print(f"memoguard calibrate: {e}", file=sys.stderr)
        return 2
    print(f"{model.name} ({cal.model_key}): {len(cal.scores)} benign {cal.detector} scores ({len(prompts)} prompts x "
          f"{args.seeds} seeds) at noise level "
          f"{cal.conditions['noise_level']:.4g}, median {cal.median:.4f}, threshold at 1% FPR "
          f"{cal.threshold(0.01):.4f}{', band over ' + str(len(cal.band.median)) + ' steps' if cal.band else ''} -> {out}")
    if model.parameterization == "flow":  # diffusers splits the attention projections the original files fuse
        print("ComfyUI and Forge Neo hold this model's weights in its original layout, whose key differs: calibrate "
              "it there (MemoGuard Calibrate, the panel's Calibrate).")
    else:
        print("Hosts find it by the model's key: copy the file into ComfyUI/models/memoguard/ or "
              "stable-diffusion-webui/models/memoguard/.")
    return 0
