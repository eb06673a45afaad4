"""Small charts as ComfyUI IMAGE tensors (B, H, W, 3) in [0, 1], drawn with Pillow."""
import math
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 512, 256, 36
COLORS = [(66, 135, 245), (245, 130, 48), (60, 180, 75), (230, 25, 75), (145, 30, 180), (70, 240, 240)]


def to_image_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


def score_plot(per_step: Sequence[Sequence[float]], threshold: Optional[float], title: str) -> torch.Tensor:
    """per_step[i][b]: score of image b at step i; one line per image, a dashed threshold line."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, 8), title[:80], fill="black")
    values = [v for row in per_step for v in row if math.isfinite(v)]
    if threshold is not None and math.isfinite(threshold):
        values.append(threshold)
    top = max(values) * 1.1 if values and max(values) > 0 else 1.0
    steps = max(len(per_step), 2)
    x_of = lambda i: MARGIN + (WIDTH - 2 * MARGIN) * i / (steps - 1)
    y_of = lambda v: HEIGHT - MARGIN - (HEIGHT - 2 * MARGIN) * v / top
    draw.line([(MARGIN, HEIGHT - MARGIN), (WIDTH - MARGIN, HEIGHT - MARGIN)], fill="gray")
    draw.line([(MARGIN, MARGIN), (MARGIN, HEIGHT - MARGIN)], fill="gray")
    draw.text((4, MARGIN - 6), f"{top:.3g}", fill="gray")
    draw.text((WIDTH - MARGIN - 40, HEIGHT - MARGIN + 6), f"step {len(per_step) - 1}", fill="gray")
    if threshold is not None and math.isfinite(threshold):
        for x in range(MARGIN, WIDTH - MARGIN, 12):
            draw.line([(x, y_of(threshold)), (x + 6, y_of(threshold))], fill=(200, 0, 0))
        draw.text((WIDTH - MARGIN - 80, y_of(threshold) - 12), f"threshold {threshold:.3g}", fill=(200, 0, 0))
    for b in range(len(per_step[0]) if per_step else 0):
        points = [(x_of(i), y_of(row[b])) for i, row in enumerate(per_step) if math.isfinite(row[b])]
        if len(points) > 1:
            draw.line(points, fill=COLORS[b % len(COLORS)], width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=COLORS[b % len(COLORS)])
    return to_image_tensor(image)


def token_bars(tokens: List[str], shares: List[float], title: str) -> torch.Tensor:
    """One horizontal bar per token, length = its share of the total contribution."""
    row = 18
    height = max(HEIGHT, 2 * MARGIN + row * len(tokens))
    image = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, 8), title[:80], fill="black")
    top = max(shares) if shares and max(shares) > 0 else 1.0
    for i, (token, share) in enumerate(zip(tokens, shares)):
        y = MARGIN + i * row
        draw.text((8, y + 2), token[:14], fill="black")
        length = (WIDTH - 180) * share / top
        draw.rectangle([120, y + 2, 120 + length, y + row - 4], fill=(230, 25, 75))
        draw.text((126 + length, y + 2), f"{100 * share:.1f}%", fill="black")
    return to_image_tensor(image)
