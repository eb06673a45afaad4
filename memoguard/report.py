"""Pictures and HTML for humans: score-per-step plots, token bar charts, image strips.

Drawn with pillow only, so every host (and CI) can render them. Adapters reuse these for their
IMAGE outputs and panels.
"""
import html
import io
import math
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

PALETTE = [(220, 60, 60), (60, 120, 220), (40, 160, 90), (230, 150, 30), (150, 80, 200), (90, 90, 90)]


def to_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image_strip(images: np.ndarray, scale: int = 8) -> Image.Image:
    """(N, H, W, 3) in [0, 1] -> one row, nearest-neighbour upscaled."""
    arr = (np.clip(np.asarray(images), 0, 1) * 255).round().astype(np.uint8)
    row = np.concatenate(list(arr), axis=1)
    img = Image.fromarray(row)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def score_plot(series: Sequence[Sequence[float]], threshold: Optional[float] = None,
               labels: Optional[Sequence[str]] = None, size=(360, 180), title: str = "") -> Image.Image:
    """Score per step, one line per series, with the threshold as a dashed red line."""
    w, h = size
    pad_l, pad_r, pad_t, pad_b = 44, 8, 24 if title else 10, 22
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((pad_l, 4), title[:80], fill="black")
    values = [v for s in series for v in s if math.isfinite(v)]
    if threshold is not None and math.isfinite(threshold):
        values.append(threshold)
    if not values:
        d.text((pad_l, h // 2), "no score", fill="black")
        return img
    hi = max(values) * 1.1 or 1.0
    n = max(len(s) for s in series)
    x_of = lambda i: pad_l + (w - pad_l - pad_r) * (i / max(n - 1, 1))
    y_of = lambda v: h - pad_b - (h - pad_t - pad_b) * (v / hi)
    d.line([(pad_l, pad_t), (pad_l, h - pad_b), (w - pad_r, h - pad_b)], fill="black")
    d.text((2, pad_t - 4), f"{hi:.3g}", fill="black")
    d.text((2, h - pad_b - 6), "0", fill="black")
    d.text((pad_l, h - pad_b + 6), "step 1", fill="black")
    d.text((w - pad_r - 40, h - pad_b + 6), f"step {n}", fill="black")
    if threshold is not None and math.isfinite(threshold):
        y = y_of(threshold)
        for x in range(pad_l, w - pad_r, 8):
            d.line([(x, y), (min(x + 4, w - pad_r), y)], fill=(200, 0, 0))
    for k, s in enumerate(series):
        pts = [(x_of(i), y_of(v)) for i, v in enumerate(s) if math.isfinite(v)]
        color = PALETTE[k % len(PALETTE)]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        for x, y in pts[:1]:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        if labels:
            d.text((pad_l + 6, pad_t + 12 * k), labels[k][:40], fill=color)
    return img


def token_bars(tokens: Sequence[str], shares: Sequence[float], width: int = 360, title: str = "") -> Image.Image:
    """Horizontal bars, one per token, length = share of the total contribution."""
    row, top_pad = 16, 20 if title else 4
    img = Image.new("RGB", (width, max(row * len(tokens) + top_pad + 4, 24)), "white")
    d = ImageDraw.Draw(img)
    d.text((4, 4), title[:80], fill="black")
    top = max(shares) if shares else 1.0
    for i, (tok, share) in enumerate(zip(tokens, shares)):
        y = top_pad + i * row
        d.text((4, y), tok[:14], fill="black")
        length = (width - 150) * (share / top if top > 0 else 0)
        d.rectangle([100, y + 2, 100 + length, y + row - 3], fill=share_color(share / top if top else 0))
        d.text((106 + length, y), f"{100 * share:.1f}%", fill="black")
    return img


def share_color(level: float):
    """White -> red by relative contribution in [0, 1]."""
    level = min(max(level, 0.0), 1.0)
    return (255, int(235 - 175 * level), int(235 - 175 * level))


def tokens_html(tokens: Sequence[str], shares: Sequence[float]) -> str:
    """Tokens as inline spans coloured by their share (relative to the largest)."""
    top = max(shares) if shares else 1.0
    spans = []
    for tok, share in zip(tokens, shares):
        r, g, b = share_color(share / top if top > 0 else 0)
        spans.append(f'<span class="mg-tok" style="background:rgb({r},{g},{b})" '
                     f'title="{100 * share:.1f}%">{html.escape(tok)}</span>')
    return " ".join(spans)


def summary_sheet(rows: Sequence[Sequence[Image.Image]], captions: Sequence[str], gap: int = 8) -> Image.Image:
    """Rows of pictures, each under a caption line, on one white sheet (the README's picture)."""
    line = 14
    width = max(sum(im.width for im in row) + gap * (len(row) + 1) for row in rows)
    heights = [max(im.height for im in row) + line + gap for row in rows]
    sheet = Image.new("RGB", (width, sum(heights) + gap), "white")
    d = ImageDraw.Draw(sheet)
    y = gap
    for row, caption, h in zip(rows, captions, heights):
        d.text((gap, y), caption, fill="black")
        x = gap
        for im in row:
            sheet.paste(im, (x, y + line))
            x += im.width + gap
        y += h
    return sheet


HTML_HEAD = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body{{font-family:system-ui,sans-serif;margin:24px;max-width:1100px}} .mg-tok{{padding:1px 3px;border-radius:3px}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}}
.flag{{color:#b00;font-weight:bold}} .ok{{color:#070}} img{{image-rendering:pixelated}}
</style></head><body>"""


def html_page(title: str, body_parts: List[str]) -> str:
    return HTML_HEAD.format(title=html.escape(title)) + f"<h1>{html.escape(title)}</h1>" + "\n".join(body_parts) + "</body></html>"
