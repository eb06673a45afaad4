"""Ground truth on the bundled model: did a generation copy a training image, and is it faithful?

Copy, by outcome (Carlini et al. 2023's extraction test, in pixel space): a generation copies
when its distance to the nearest training image is under COPY_RATIO times its mean distance to
the next 49 nearest. Measured on the bundled model (BENCHMARKS.md): generations of duplicated
captions that copy sit at a ratio of 0.2-0.45, generations of ordinary and novel captions at 0.6-0.95 —
being close to *some* render of the same colour and shape is not copying, being far closer to
one image than to all its neighbours is.

Alignment (prompt faithfulness that does not reward copying, in place of a CLIP score): the
attributes the caption states — shape colour always, and background or position when given —
read off the image. A copy of a memorized image scores exactly as a fresh faithful render does.
"""
from typing import Sequence

import numpy as np

from .data import BACKGROUNDS, COLORS, POSITIONS, Scene

COPY_RATIO = 0.5
NEIGHBOURS = 50

_BG = {k: np.array(v, np.float32) / 255 for k, v in BACKGROUNDS.items()}
_FG = {k: np.array(v, np.float32) / 255 for k, v in COLORS.items()}


def _as_array(images) -> np.ndarray:
    arr = images.numpy() if hasattr(images, "numpy") else np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) in [0, 1], got {arr.shape}")
    return arr.astype(np.float32)


def unique_training_images(images: np.ndarray) -> np.ndarray:
    """Training set with the duplicated pairs counted once."""
    flat = images.reshape(len(images), -1)
    _, first = np.unique(flat, axis=0, return_index=True)
    return images[np.sort(first)]


def nearest_training(images, training_images: np.ndarray):
    """(index of the nearest training image, its RMSE, the copy ratio) for each image."""
    gen = _as_array(images).reshape(len(images), -1)
    train = training_images.reshape(len(training_images), -1).astype(np.float32)
    d2 = (gen ** 2).sum(1)[:, None] - 2 * gen @ train.T + (train ** 2).sum(1)[None, :]
    rmse = np.sqrt(np.maximum(d2, 0) / gen.shape[1])
    order = np.argsort(rmse, axis=1)[:, :NEIGHBOURS]
    nearest = np.take_along_axis(rmse, order, axis=1)
    ratio = nearest[:, 0] / np.maximum(nearest[:, 1:].mean(1), 1e-12)
    return order[:, 0], nearest[:, 0], ratio


def is_copy(images, training_images: np.ndarray) -> np.ndarray:
    return nearest_training(images, training_images)[2] < COPY_RATIO


def _nearest(color: np.ndarray, palette: dict) -> str:
    return min(palette, key=lambda k: float(((palette[k] - color) ** 2).sum()))


def read_scene(image: np.ndarray):
    """(background, shape colour, position) read off one 16x16 image."""
    corners = np.concatenate([image[:3, :3], image[:3, -3:], image[-3:, :3], image[-3:, -3:]]).reshape(-1, 3)
    bg = np.median(corners, axis=0)
    diff = np.sqrt(((image - bg) ** 2).sum(-1))
    fg = diff > 0.25
    if fg.sum() < 3:
        return _nearest(bg, _BG), None, None
    ys, xs = np.nonzero(fg)
    color = np.median(image[fg], axis=0)
    cx, cy = np.median(xs) + 0.5, np.median(ys) + 0.5
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    return _nearest(bg, _BG), _nearest(color, _FG), position


def alignment(images, scenes: Sequence[Scene]) -> np.ndarray:
    """Share of the caption's stated attributes (colour; background, position if given) each image shows."""
    arr = _as_array(images)
    if len(arr) != len(scenes):
        raise ValueError(f"{len(arr)} images but {len(scenes)} scenes")
    out = []
    for img, scene in zip(arr, scenes):
        bg, color, pos = read_scene(img)
        checks = [color == scene.color]
        if scene.background:
            checks.append(bg == scene.background)
        if scene.position:
            checks.append(pos == scene.position)
        out.append(np.mean(checks))
    return np.array(out)
