"""How long indexing a training folder takes on this machine (memoguard.evidence): a folder of N photo-sized images
(half 768x512 JPEG, half 512x512 PNG, smooth random content) is written, indexed from nothing, opened again (every
entry reused), and indexed again after 1 % of its images changed. Times are printed side by side with the writing
time of the same folder as the reference.

    python benchmarks/index_throughput.py --images 10000 --json benchmarks/index_throughput.json
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memoguard.evidence import TrainingIndex  # noqa: E402


def picture(rng, size):
    """A smooth random picture: low-resolution noise upscaled, plus fine grain."""
    w, h = size
    base = Image.fromarray(rng.integers(0, 256, (h // 64, w // 64, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    grain = rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(base, np.float32) + grain, 0, 255).astype(np.uint8))


def write_folder(folder: Path, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = folder / f"{10}_{i // 1000}"  # kohya's repeat folders
        sub.mkdir(exist_ok=True)
        if i % 2:
            picture(rng, (768, 512)).save(sub / f"{i:05d}.jpg", quality=90)
        else:
            picture(rng, (512, 512)).save(sub / f"{i:05d}.png", compress_level=1)
        (sub / f"{i:05d}.txt").write_text(f"a photo, item {i}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder, cache = Path(tmp) / "dataset", Path(tmp) / "cache"
        folder.mkdir()
        t0 = time.time()
        write_folder(folder, args.images)
        written = time.time() - t0
        t0 = time.time()
        index = TrainingIndex.open(folder, cache)
        first = time.time() - t0
        t0 = time.time()
        TrainingIndex.open(folder, cache)
        again = time.time() - t0
        changed = sorted(folder.rglob("*.png"))[: args.images // 100]
        rng = np.random.default_rng(1)
        for path in changed:
            picture(rng, (512, 512)).save(path)
            os.utime(path, ns=(time.time_ns(), time.time_ns() + 1))
        t0 = time.time()
        TrainingIndex.open(folder, cache)
        update = time.time() - t0
    result = {"images": len(index), "cpu_count": os.cpu_count(), "write_seconds": round(written, 1),
              "index_seconds": round(first, 1), "reopen_seconds": round(again, 2),
              "update_seconds": round(update, 1), "changed": len(changed),
              "images_per_second": round(len(index) / first, 1), "index_over_write": round(first / written, 2)}
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
