"""Copy evidence on both evaluation models: does the training-image index name the image a copy reproduces, and how
many generations that copy nothing reach the copy threshold?

Per model: its training set (each distinct image once) is written as PNG files with kohya-style .txt captions and
indexed through memoguard.evidence, as a user's folder would be. The copy threshold is calibrated on ordinary
generations (the set's benign captions that are not training captions, as `memoguard index --calibrate` takes them, at 1 % FPR). Then the evaluation prompts (memorized captions,
ordinary, novel and other-style captions, random strings) are sampled with 4 seeds, and the ground-truth judge
(memoguard.tiny.judge, pixel space) says which images copy and which training image they copy. Printed and written:
- source: of the judged copies, the share whose nearest indexed image is the one the judge names (for memorized
  captions, the caption's own duplicated image);
- the copy verdict at the threshold (the product's: the copy ratio): copies reaching it (recall) and non-copies
  reaching it (false positives); the same for the nearest image's similarity alone and for the perceptual hash
  alone (nearest by hash distance, threshold on the distance), each calibrated the same way.

    python benchmarks/copy_evidence.py --json benchmarks/copy_evidence.json [--quick]
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memoguard.calibration import threshold_at_fpr  # noqa: E402
from memoguard.cli.index import ordinary_images  # noqa: E402
from memoguard.evidence import TrainingIndex, hash_distances, ordinary_prompts, perceptual_hashes  # noqa: E402
from memoguard.standalone.diffusers_model import BUNDLED_MODEL, load_model  # noqa: E402
from memoguard.standalone.pipeline import generate  # noqa: E402
from memoguard.tiny import judge  # noqa: E402
from memoguard.tiny.evalsets import eval_set_for  # noqa: E402
from memoguard.resources import asset_path  # noqa: E402

MODELS = {"bundled": BUNDLED_MODEL, "second": asset_path("tiny-ldm")}
SEEDS = (0, 1, 2, 3)
FPR = 0.01


def measure(name: str, quick: bool, log=print) -> dict:
    model = load_model(MODELS[name])
    evalset = eval_set_for(model)
    steps = 20 if quick else 50
    with tempfile.TemporaryDirectory() as tmp:
        folder, cache = Path(tmp) / "train", Path(tmp) / "cache"
        n = evalset.write_training_folder(folder)
        t0 = time.time()
        index = TrainingIndex.open(folder, cache)
        index_s = time.time() - t0
    train = evalset.train_images
    log(f"{name}: {n} training images indexed in {index_s:.1f} s")
    ordinary = ordinary_images(model, ordinary_prompts(evalset.benign_prompts(), index.captions),
                               150 if quick else 300, steps)
    threshold = index.calibrate_copies(model.model_key, ordinary, FPR, note="benchmark")
    ordinary_copies = int((judge.nearest_training(ordinary, train)[2] < evalset.copy_ratio).sum())
    ordinary_hashes = hash_distances(index.hashes, perceptual_hashes(ordinary)).min(1).astype(float)
    hash_threshold = -threshold_at_fpr((-ordinary_hashes).tolist(), FPR)  # a copy is at most this many bits away
    log(f"  {ordinary_copies} of the {len(ordinary)} ordinary generations copy a training image (the judge)")
    prompts = evalset.prompts(per_kind=20 if quick else 50)
    images, _ = generate(model, [p.text for p in prompts], SEEDS, steps=steps)
    kinds = np.repeat([p.kind for p in prompts], len(SEEDS))
    images = images.reshape(-1, *images.shape[2:])
    source, _, ratio = judge.nearest_training(images, train)
    copies = ratio < evalset.copy_ratio
    matches = index.nearest(images, model.model_key)
    named = np.array([int(m.file[:5]) for m in matches])
    sims = np.array([m.similarity for m in matches])
    ratios = np.array([m.ratio for m in matches])
    sim_threshold = threshold_at_fpr(index.neighbours(ordinary)[1].tolist(), FPR)
    dists = hash_distances(index.hashes, perceptual_hashes(images))
    hash_named, hash_best = dists.argmin(1), dists.min(1)
    out = {"model": name, "training_images": n, "index_seconds": round(index_s, 2), "steps": steps,
           "ordinary_generations": len(ordinary), "ordinary_judged_copies": ordinary_copies, "fpr": FPR, "threshold": threshold, "similarity_threshold": sim_threshold,
           "hash_threshold_bits": float(hash_threshold), "images": len(images), "copies": int(copies.sum()),
           "copies_by_kind": {k: int(copies[kinds == k].sum()) for k in sorted(set(kinds))}}
    for label, picked, hits in (("ratio", named, ratios <= threshold), ("similarity", named, sims >= sim_threshold),
                                 ("phash", hash_named, hash_best <= hash_threshold)):
        out[label] = {
            "source_rate": float((picked[copies] == source[copies]).mean()) if copies.any() else None,
            "copies_flagged": int((hits & copies).sum()), "non_copies": int((~copies).sum()),
            "non_copies_flagged": int((hits & ~copies).sum()),
            "non_copies_flagged_by_kind": {k: int((hits & ~copies)[kinds == k].sum()) for k in sorted(set(kinds))}}
        r = out[label]
        log(f"  {label:9s}: nearest is the copied image for {r['source_rate']:.3f} of {copies.sum()} copies; "
            f"at the copy threshold {r['copies_flagged']}/{copies.sum()} copies and {r['non_copies_flagged']}/"
            f"{r['non_copies']} non-copies flagged")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="fewer prompts and steps")
    args = p.parse_args(argv)
    result = {"quick": args.quick, "seeds": list(SEEDS), "models": [measure(m, args.quick) for m in MODELS]}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
