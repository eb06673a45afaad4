"""Charts as ComfyUI IMAGE tensors (B, H, W, 3) in [0, 1]; drawn by memoguard.report."""
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from memoguard import report


def to_image_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


def score_plot(per_step: Sequence[Sequence[float]], threshold: Optional[float], title: str) -> torch.Tensor:
    """per_step[i][b]: score of image b at step i; one line per image, a dashed threshold line."""
    series = [list(image) for image in zip(*per_step)]
    return to_image_tensor(report.score_plot(series, threshold, size=(512, 256), title=title))


def token_bars(tokens: List[str], shares: List[float], title: str) -> torch.Tensor:
    """One horizontal bar per token, length = its share of the total contribution."""
    return to_image_tensor(report.token_bars(tokens, shares, width=512, title=title))
