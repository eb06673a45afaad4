"""`python -m memoguard index DIR`: index a folder of training images for copy evidence (memoguard.evidence).

Builds or brings up to date the index of DIR (images in subfolders too, kohya-style .txt / .caption captions beside
them), cached in --cache (default $MEMOGUARD_INDEXES or ~/.cache/memoguard/indexes): only new or changed images are
described again, and an interrupted build goes on from where it stopped. --duplicates lists the near-duplicate
pairs inside the dataset. --calibrate --model PATH sets the copy verdict's threshold for that model: it samples
--generations ordinary images (benign prompts, none of them a caption of the folder) and stores the copy ratio that
--fpr of them reach. `generate --training-images DIR` then names each image's nearest training image with its verdict.
"""
import sys
import time
from pathlib import Path

from ..calibration import default_benign_prompts
from ..errors import ArgumentError
from ..standalone.pipeline import DEFAULT_STEPS


def add_arguments(p):
    p.add_argument("folder", type=Path, help="folder of training images (and their .txt captions)")
    p.add_argument("--cache", type=Path, default=None,
                   help="folder of the cached indexes (default $MEMOGUARD_INDEXES or ~/.cache/memoguard/indexes)")
    p.add_argument("--write-evaluation-set", choices=("shapes", "outdoor"), default=None,
                   help="first write an evaluation model's training set into the folder (shapes: the bundled model's, "
                        "outdoor: the second model's), as a dataset to try copy evidence on")
    p.add_argument("--duplicates", action="store_true",
                   help="list near-duplicate pairs inside the folder (thumbnail similarity >= 0.98 or pHash <= 4 bits)")
    p.add_argument("--calibrate", action="store_true",
                   help="set the copy threshold for --model from ordinary generations of it")
    p.add_argument("--model", type=Path, default=None,
                   help="with --calibrate: diffusers folder or .safetensors/.ckpt (default: the bundled tiny model)")
    p.add_argument("--prompts", type=Path, default=None,
                   help="with --calibrate: ordinary prompts (.txt/.csv/.jsonl; default: the shipped benign list, or "
                        "an evaluation model's own ordinary captions)")
    p.add_argument("--generations", type=int, default=100,
                   help="with --calibrate: ordinary images sampled (default 100, the fewest a 1%% threshold needs)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"with --calibrate: steps (default {DEFAULT_STEPS})")
    p.add_argument("--fpr", type=float, default=0.01,
                   help="with --calibrate: share of ordinary generations the copy verdict may flag (default 0.01)")


def open_index(folder: Path, cache=None):
    """The up-to-date index of `folder`, with progress on stderr."""
    from ..evidence import TrainingIndex, default_index_folder

    def progress(done, total):
        sys.stderr.write(f"\r  indexing {folder.name}: {done}/{total} new or changed images")
        if done == total:
            sys.stderr.write("\n")

    index = TrainingIndex.open(folder, cache or default_index_folder(), progress=progress)
    for problem in index.unreadable:
        print(f"note: skipped an unreadable image: {problem}", file=sys.stderr)
    return index


def calibration_prompts(args, model, captions) -> list:
    """Prompts for the ordinary generations: --prompts, an evaluation model's ordinary captions or the shipped benign
    list, none of them a caption of the dataset."""
    from ..evidence import ordinary_prompts
    from ..tiny.evalsets import eval_set_for
    from .lib.inputs import read_prompts
    if args.prompts is not None:
        prompts = [p for p, _ in read_prompts(args.prompts)]
    elif getattr(model, "training_notes", {}).get("dataset") or args.model is None:
        prompts = eval_set_for(model).benign_prompts()
    else:
        prompts = default_benign_prompts()
    prompts = ordinary_prompts(prompts, captions)
    if not prompts:
        raise ArgumentError("every ordinary prompt is a caption of the dataset: give --prompts with other prompts")
    return prompts


def ordinary_images(model, prompts, n: int, steps: int, log=lambda text: None):
    """(n, H, W, 3) images of the prompts in turn, a prompt used again at the next seed."""
    import numpy as np
    from ..standalone.pipeline import generate
    picked = [prompts[i % len(prompts)] for i in range(n)]
    seeds = [i // len(prompts) for i in range(n)]
    images = []
    for seed in sorted(set(seeds)):
        rows = [p for p, s in zip(picked, seeds) if s == seed]
        log(f"  sampling {len(rows)} ordinary images (seed {seed}) ...")
        images.append(generate(model, rows, [seed], steps=steps)[0][:, 0])
    return np.concatenate(images)


def run(args) -> int:
    from ..evidence import cache_file, default_index_folder
    if args.generations < 1 or args.steps < 1:
        raise ArgumentError("--generations and --steps must be >= 1")
    if args.write_evaluation_set:
        from ..tiny.evalsets import eval_set
        written = eval_set(args.write_evaluation_set).write_training_folder(args.folder)
        print(f"wrote the {args.write_evaluation_set} evaluation set's {written} training images to {args.folder}")
    t0 = time.time()
    index = open_index(args.folder, args.cache)
    cache = cache_file(args.folder, args.cache or default_index_folder())
    captioned = sum(1 for c in index.captions if c)
    print(f"{args.folder}: {len(index)} images ({captioned} with captions) indexed in {time.time() - t0:.1f} s -> {cache}")
    if args.duplicates:
        pairs = index.near_duplicates()
        print(f"{len(pairs)} near-duplicate pairs")
        for a, b, sim, bits in pairs:
            print(f"  {a}  {b}  similarity {sim:.3f}, pHash distance {bits}")
    if args.calibrate:
        from ..standalone.diffusers_model import load_model
        model = load_model(args.model)
        images = ordinary_images(model, calibration_prompts(args, model, index.captions), args.generations,
                                 args.steps, log=lambda text: print(text, file=sys.stderr))
        threshold = index.calibrate_copies(model.model_key, images, args.fpr, note=f"{model.name}, {args.steps} steps")
        index.save_to(args.cache or default_index_folder())
        print(f"copy threshold for {model.name} ({model.model_key}): ratio <= {threshold:.4f} flags "
              f"{args.fpr:g} of {args.generations} ordinary generations")
    return 0
