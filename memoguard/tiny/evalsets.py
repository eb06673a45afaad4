"""The evaluation models' ground truth, one entry per training set: what bench measures against.

`shapes` is the bundled model's (data.py, pixel space); `outdoor` the second evaluation model's
(outdoor.py, trained through its own VAE by train_outdoor.py). A model folder names its set in
memoguard_training.json ("dataset"); any other model is measured against the bundled set, as before.
"""
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, List

import numpy as np

from . import judge
from .prompts import EvalPrompt, eval_prompts


@dataclass
class EvalSet:
    name: str
    build_dataset: Callable
    alignment: Callable          # (images N x H x W x 3 in [0, 1], scenes) -> N shares of stated attributes shown
    copy_ratio: float            # judge.nearest_training's ratio under which a generation copies

    @cached_property
    def dataset(self):
        return self.build_dataset(0)

    @cached_property
    def train_images(self) -> np.ndarray:
        """Each distinct training image once, in the order of its first sample."""
        return judge.unique_training_images(self.dataset.images)

    def write_training_folder(self, folder) -> int:
        """The distinct training images (train_images' order) as PNG files 00000.png ... with their captions beside
        them in .txt files, as a fine-tuner's dataset folder is laid out; returns how many."""
        from pathlib import Path

        from PIL import Image
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        ds = self.dataset
        _, first = np.unique(ds.images.reshape(len(ds.images), -1), axis=0, return_index=True)
        for k, i in enumerate(np.sort(first)):
            Image.fromarray((ds.images[i] * 255).round().astype(np.uint8)).save(folder / f"{k:05d}.png")
            (folder / f"{k:05d}.txt").write_text(ds.captions[i], encoding="utf-8")
        return len(first)

    def is_copy(self, images) -> np.ndarray:
        return judge.nearest_training(images, self.train_images)[2] < self.copy_ratio

    def prompts(self, per_kind: int = 100) -> List[EvalPrompt]:
        return eval_prompts(self.dataset, per_kind)

    def benign_prompts(self, n: int = 300, seed: int = 99) -> List[str]:
        """Ordinary captions of the training scenes and novel ones, in both caption styles: the set's benign
        calibration prompts (the shipped list is written for SD-sized models)."""
        ds, rng = self.dataset, np.random.default_rng(seed)
        scenes = ds.ordinary_train_scenes + ds.novel_scenes
        picked = [scenes[i] for i in rng.choice(len(scenes), n, replace=False)]
        return [s.caption() if i % 3 else s.caption_other_style() for i, s in enumerate(picked)]


def _shapes():
    from .data import build_dataset
    return EvalSet("shapes", build_dataset, judge.alignment, judge.COPY_RATIO)


def _outdoor():
    from . import outdoor
    return EvalSet("outdoor", outdoor.build_dataset, outdoor.alignment, outdoor.COPY_RATIO)


EVAL_SETS = {"shapes": _shapes, "outdoor": _outdoor}
_cache = {}


def eval_set(name: str) -> EvalSet:
    if name not in EVAL_SETS:
        raise ValueError(f"unknown evaluation set {name!r} (known: {', '.join(EVAL_SETS)})")
    if name not in _cache:
        _cache[name] = EVAL_SETS[name]()
    return _cache[name]


def eval_set_for(model) -> EvalSet:
    """The set a model was trained on (its folder's notes), else the bundled model's."""
    return eval_set(getattr(model, "training_notes", {}).get("dataset", "shapes"))
