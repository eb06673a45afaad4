"""Charts as ComfyUI IMAGE tensors (B, H, W, 3) in [0, 1]; drawn by memoguard.report."""
import logging
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from memoguard import report

log = logging.getLogger("memoguard")


def to_image_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


def _failed(size, what: str, error: Exception) -> Image.Image:
    """A chart that could not be drawn must not stop the workflow (the user's image matters more)."""
    log.exception("MemoGuard: could not draw the %s", what)
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((8, size[1] // 2), f"{what} not drawn: {type(error).__name__}: {error}"[:90], fill="black")
    return img


def score_plot(per_step: Sequence[Sequence[float]], threshold: Optional[float], title: str, *,
               band: Optional[Sequence[Optional[Sequence[float]]]] = None, window: Optional[int] = None,
               labels: Optional[Sequence[str]] = None, notes: Sequence[str] = (),
               empty: Optional[str] = None) -> torch.Tensor:
    """per_step[i][b]: score of image b at step i (None/NaN = missing); one line per image.

    band[i]: benign (median, high) at step i or None; window: the verdict's steps from step 0 (shaded,
    threshold dashed across them only); labels[b]: legend text of image b (e.g. "image 1: flagged");
    notes: how the run differs from its calibration; empty: what to say when there is no score."""
    size = (512, 256 + 12 * min(len(labels or []), 5) + 12 * min(len(notes), 3))
    try:
        series = [list(image) for image in zip(*per_step)] if per_step else []
        return to_image_tensor(report.score_plot(series, threshold, labels, size=size, title=title, band=band,
                                                 window=window, notes=notes, empty=empty or title or "no score"))
    except Exception as e:  # noqa: BLE001
        return to_image_tensor(_failed(size, "score plot", e))


def token_bars(tokens: List[str], shares: List[float], title: str) -> torch.Tensor:
    """Horizontal bars, length = share of the total contribution (long prompts: the largest, then a count)."""
    try:
        return to_image_tensor(report.token_bars(tokens, shares, width=512, title=title))
    except Exception as e:  # noqa: BLE001
        return to_image_tensor(_failed((512, 64), "token chart", e))


def message_image(text: str, size=(512, 256)):
    """A white picture with one line of text, as an IMAGE tensor."""
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((12, size[1] // 2 - 6), text[:90], fill="black")
    return to_image_tensor(img)
