"""Pictures and HTML for humans: score-per-step plots, token bar charts, image strips.

Drawn with pillow only, so every host (and CI) can render them. Adapters reuse these for their
IMAGE outputs and panels.
"""
import html
import io
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = [(220, 60, 60), (60, 120, 220), (40, 160, 90), (230, 150, 30), (150, 80, 200), (90, 90, 90)]
# score lines, one per image (red is kept for the threshold and for "flagged"); js/memoguard.js uses the same
LINE_COLORS = [(45, 110, 220), (235, 130, 20), (40, 160, 90), (150, 80, 200), (0, 160, 170), (120, 90, 60)]


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


BAND_FILL = (207, 223, 242)      # benign band, median..upper edge
BAND_EDGE = (120, 150, 195)      # its median line
WINDOW_FILL = (252, 243, 214)    # the verdict window's steps
GRID = (232, 232, 232)
THRESHOLD = (200, 0, 0)
NO_BAND_TEXT = "no benign band (uncalibrated, or this run is outside the calibrated range)"


def _finite(v) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def nice_ticks(hi: float, count: int = 4) -> List[float]:
    """0 and round values up to about `hi` (1, 2, 2.5 or 5 times a power of ten apart)."""
    if not _finite(hi) or hi <= 0:
        return [0.0]
    raw = hi / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [round(k * step, 12) for k in range(int(hi / step + 1e-9) + 1)]


LOG_SPAN = 6   # values spanning more than this factor get a logarithmic score axis (as js/memoguard.js)


def log_ticks(lo: float, hi: float) -> List[float]:
    """1-2-5 values between lo and hi (only 1s and 5s when that gives more than 6)."""
    ticks = [float(f"{m}e{e}") for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
             for m in (1, 2, 5) if lo <= float(f"{m}e{e}") <= hi]
    return [t for t in ticks if f"{t:e}"[0] in "15"] if len(ticks) > 6 else ticks


def _fmt(v: float) -> str:
    return f"{v:.3g}" if v else "0"


def _wrap(d: ImageDraw.ImageDraw, text: str, width: float, font) -> List[str]:
    """Greedy word wrap to `width` pixels (a word longer than a line is cut at the line end)."""
    lines, line = [], ""
    for word in str(text).split():
        trial = f"{line} {word}".strip()
        if d.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
        while d.textlength(line, font=font) > width and len(line) > 1:
            cut = len(line)
            while cut > 1 and d.textlength(line[:cut], font=font) > width:
                cut -= 1
            lines.append(line[:cut])
            line = line[cut:]
    if line:
        lines.append(line)
    return lines


class PlotAxes:
    """Where score_plot puts a (step, score) point: step i (0-based) and score v -> pixel (x, y)."""

    def __init__(self, left: int, top: int, right: int, bottom: int, steps: int, hi: float, lo: Optional[float] = None):
        self.left, self.top, self.right, self.bottom = left, top, right, bottom
        self.steps, self.hi = max(int(steps), 1), hi
        self.lo = lo                   # set: logarithmic score axis from lo to hi
        self.ticks: List[float] = []

    def x(self, i: float) -> float:
        if self.steps == 1:
            return (self.left + self.right) / 2
        return self.left + (self.right - self.left) * i / (self.steps - 1)

    def y(self, v: float) -> float:
        if self.lo is not None:
            at = (math.log(v) - math.log(self.lo)) / (math.log(self.hi) - math.log(self.lo)) if v > 0 else 0.0
        else:
            at = v / self.hi
        return self.bottom - (self.bottom - self.top) * min(max(at, 0.0), 1.05)

    def column(self, i: float) -> Tuple[float, float]:
        """Horizontal extent of step i's column (half-way to its neighbours), clipped to the plot."""
        half = (self.right - self.left) / (2 * max(self.steps - 1, 1)) if self.steps > 1 else (self.right - self.left) / 2
        return max(self.left, self.x(i) - half), min(self.right, self.x(i) + half)


def _band_rows(band, n):
    rows = list(band or [])[:n]
    out = []
    for row in rows:
        if row is not None and len(row) >= 2 and _finite(row[0]) and _finite(row[1]):
            out.append((float(row[0]), float(row[1])))
        else:
            out.append(None)
    return out + [None] * (n - len(out))


def score_axes(series: Sequence[Sequence[float]], threshold: Optional[float] = None, size=(360, 180),
               title: str = "", band=None, window: Optional[int] = None, legend_lines: int = 0,
               note_lines: int = 0) -> Optional[PlotAxes]:
    """The axes score_plot draws on (None when there is nothing to draw)."""
    w, h = size
    series = [list(s) for s in (series or [])]
    n = max([len(s) for s in series] + [len(band or [])] + [0])
    values = [float(v) for s in series for v in s if _finite(v)]
    if not values:
        return None
    values += [hi for row in _band_rows(band, n) if row for hi in row]
    if _finite(threshold):
        values.append(float(threshold))
    if not values or n == 0:
        return None
    top_value = max(values)
    positive = [v for v in values if v > 0]
    lo = None
    if positive and top_value / min(positive) > LOG_SPAN:
        lo, hi = min(positive) / 1.15, top_value * 1.15
        ticks = log_ticks(lo, hi)
    else:
        ticks = nice_ticks(top_value * 1.1 if top_value > 0 else 1.0)
        hi = max(top_value * 1.08, ticks[-1]) or 1.0
    pad_t = (16 if title else 6) + 6
    pad_b = 30 + 12 * (legend_lines + note_lines)
    pad_l = 8 + 6 * max(len(_fmt(t)) for t in ticks)
    axes = PlotAxes(pad_l, pad_t, w - 10, h - pad_b, n, hi, lo)
    axes.ticks = [t for t in ticks if t <= hi * 1.0001]
    return axes


def score_plot(series: Sequence[Sequence[float]], threshold: Optional[float] = None,
               labels: Optional[Sequence[str]] = None, size=(360, 180), title: str = "", *,
               band: Optional[Sequence[Optional[Sequence[float]]]] = None, window: Optional[int] = None,
               notes: Sequence[str] = (), no_band: str = NO_BAND_TEXT, empty: str = "no score") -> Image.Image:
    """Score per step, one coloured line per series (image), over the benign band.

    series[k][i]: score of image k at step i (NaN/None = missing). band[i]: (median, high) of benign
    prompts at step i, or None where the calibration does not cover the step. window: the verdict's
    steps (from step 0), shaded; the threshold (dashed red) is drawn across those steps only (across
    every step when window is None). labels[k]: legend text of series k (e.g. "image 1: flagged").
    Never raises on empty, all-NaN or single-point input: it says so in words instead.
    """
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    series = [list(s) for s in (series or [])]
    labels = [str(x) for x in (labels or [])][:len(series)] if series else []
    legend = labels[:4] + ([f"... {len(labels) - 4} more"] if len(labels) > 4 else [])
    note_text = [line for note in notes for line in _wrap(d, f"note: {note}", w - 16, font)][:3]
    if title:
        d.text((6, 4), (_wrap(d, title, w - 12, font) or [""])[0], fill="black", font=font)
    axes = score_axes(series, threshold, size, title, band, window, len(legend), len(note_text))
    if axes is None:
        y = h // 2 - 6
        for line in _wrap(d, empty, w - 20, font)[:4]:
            d.text((10, y), line, fill=(90, 90, 90), font=font)
            y += 12
        return img
    n = axes.steps
    rows = _band_rows(band, n)
    # verdict window
    if window is not None and window >= 1:
        x0, _ = axes.column(0)
        _, x1 = axes.column(min(window, n) - 1)
        d.rectangle([x0, axes.top, x1, axes.bottom], fill=WINDOW_FILL)
    # grid and y ticks
    ticks = axes.ticks
    for k in range(2, 9):   # no two tick labels closer than 12 px
        if len(ticks) < 2 or abs(axes.y(ticks[0]) - axes.y(ticks[1])) >= 12:
            break
        ticks = axes.ticks[::k]
    for t in ticks:
        y = axes.y(t)
        d.line([(axes.left, y), (axes.right, y)], fill=GRID)
        label = _fmt(t)
        d.text((axes.left - 4 - d.textlength(label, font=font), y - 6), label, fill="black", font=font)
    # band: shaded median..high per step, joined between neighbouring steps that both have one
    if any(rows):
        for i, row in enumerate(rows):
            nxt = rows[i + 1] if i + 1 < n else None
            if row and nxt:
                d.polygon([(axes.x(i), axes.y(row[1])), (axes.x(i + 1), axes.y(nxt[1])),
                           (axes.x(i + 1), axes.y(nxt[0])), (axes.x(i), axes.y(row[0]))], fill=BAND_FILL)
            elif row and not (i > 0 and rows[i - 1]):
                x0, x1 = axes.x(i) - 3, axes.x(i) + 3   # an isolated step: a short bar
                d.rectangle([x0, axes.y(row[1]), x1, axes.y(row[0])], fill=BAND_FILL)
        for i in range(n - 1):
            if rows[i] and rows[i + 1]:
                d.line([(axes.x(i), axes.y(rows[i][0])), (axes.x(i + 1), axes.y(rows[i + 1][0]))], fill=BAND_EDGE)
    elif no_band:
        for j, line in enumerate(_wrap(d, no_band, axes.right - axes.left - 12, font)[:2]):
            d.text((axes.left + 6, axes.top + 2 + 12 * j), line, fill=(110, 110, 110), font=font)
    # threshold over the window
    if _finite(threshold):
        y = axes.y(float(threshold))
        x_end = axes.column(min(window, n) - 1)[1] if window else axes.right
        x0 = axes.column(0)[0] if window else axes.left
        x = x0
        while x < x_end:
            d.line([(x, y), (min(x + 5, x_end), y)], fill=THRESHOLD, width=2)
            x += 9
    # axes under the lines, so a point on an axis stays visible
    d.line([(axes.left, axes.top), (axes.left, axes.bottom), (axes.right, axes.bottom)], fill="black")
    # lines, one per image; every point also a dot, so a single step shows
    for k, s in enumerate(series):
        color = LINE_COLORS[k % len(LINE_COLORS)]
        run = []
        for i, v in enumerate(list(s)[:n] + [None]):
            if _finite(v):
                run.append((axes.x(i), axes.y(float(v))))
                continue
            if len(run) > 1:
                d.line(run, fill=color, width=2)
            run = []
        for i, v in enumerate(s[:n]):
            if _finite(v):
                x, y = axes.x(i), axes.y(float(v))
                d.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=color)
    # x ticks (steps numbered from 1)
    every = max(1, math.ceil(n / 10))
    every = next(m for m in (1, 2, 5, 10, 20, 25, 50, 100, 200, 500, 1000, every) if m >= every)
    for i in range(n):
        if (i + 1) % every and i != 0:
            continue
        x = axes.x(i)
        d.line([(x, axes.bottom), (x, axes.bottom + 3)], fill="black")
        label = str(i + 1)
        d.text((x - d.textlength(label, font=font) / 2, axes.bottom + 4), label, fill="black", font=font)
    d.text((axes.right - d.textlength("step", font=font), axes.bottom + 15), "step", fill=(90, 90, 90), font=font)
    key = []
    if any(rows):
        key.append(("benign band", BAND_FILL))
    if window:
        key.append((f"verdict window ({min(window, n)} step{'s' if min(window, n) > 1 else ''})", WINDOW_FILL))
    x = axes.left
    for text, color in key:
        d.rectangle([x, axes.bottom + 18, x + 8, axes.bottom + 26], fill=color, outline=(150, 150, 150))
        d.text((x + 11, axes.bottom + 16), text, fill=(90, 90, 90), font=font)
        x += 20 + d.textlength(text, font=font)
    y = axes.bottom + 30
    for k, text in enumerate(legend):
        color = LINE_COLORS[k % len(LINE_COLORS)] if k < 4 else (90, 90, 90)
        d.rectangle([8, y + 3, 16, y + 9], fill=color)
        d.text((20, y), (_wrap(d, text, w - 28, font) or [""])[0], fill="black", font=font)
        y += 12
    for line in note_text:
        d.text((8, y), line, fill=(140, 90, 0), font=font)
        y += 12
    return img


def token_bars(tokens: Sequence[str], shares: Sequence[float], width: int = 360, title: str = "",
               max_rows: int = 16) -> Image.Image:
    """Horizontal bars, length = share of the total contribution. Up to `max_rows` tokens in prompt
    order; a longer prompt shows its `max_rows - 1` largest tokens (largest first) and a line for the
    rest, so the picture's height stays bounded."""
    row, top_pad = 16, 20 if title else 4
    tokens = [str(t) for t in tokens]
    shares = [float(s) if _finite(s) else 0.0 for s in shares][:len(tokens)]
    tokens = tokens[:len(shares)]
    order = list(range(len(tokens)))
    rest = []
    if len(tokens) > max_rows:
        ranked = sorted(order, key=lambda i: -shares[i])
        order, rest = ranked[:max(max_rows - 1, 1)], ranked[max(max_rows - 1, 1):]
    lines = len(order) + (1 if rest else 0)
    img = Image.new("RGB", (width, max(row * lines + top_pad + 4, 24)), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.text((4, 4), title[:80], fill="black", font=font)
    if not tokens:
        d.text((4, top_pad), "no tokens", fill=(90, 90, 90), font=font)
        return img
    top = max(shares) if shares else 1.0
    for k, i in enumerate(order):
        tok, share = tokens[i], shares[i]
        y = top_pad + k * row
        d.text((4, y), tok[:14], fill="black", font=font)
        length = (width - 150) * (share / top if top > 0 else 0)
        d.rectangle([100, y + 2, 100 + length, y + row - 3], fill=share_color(share / top if top else 0))
        d.text((106 + length, y), f"{100 * share:.1f}%", fill="black", font=font)
    if rest:
        y = top_pad + len(order) * row
        d.text((4, y), f"... {len(rest)} more tokens, {100 * sum(shares[i] for i in rest):.1f}% together",
               fill=(90, 90, 90), font=font)
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


def histogram_plot(groups, threshold: Optional[float] = None, size=(480, 220), bins: int = 30,
                   title: str = "") -> Image.Image:
    """Score histograms on one axis, each group (name -> scores) as the share of its own count per bin;
    the threshold as a dashed red line. Used by the scan report (scanned prompts vs the benign calibration)."""
    colors = [(40, 90, 200), (150, 150, 150), (200, 60, 40), (40, 150, 60)]
    groups = {k: [float(v) for v in vs if _finite(v)] for k, vs in groups.items()}
    values = [v for vs in groups.values() for v in vs] + ([threshold] if threshold is not None and _finite(threshold) else [])
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.text((6, 2), title, fill="black", font=font)
    if not values:
        d.text((10, h // 2), "no scores", fill=(90, 90, 90), font=font)
        return img
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1e-6
    left, top, right, bottom = 40, 34, w - 10, h - 22
    edges = np.linspace(lo, hi, bins + 1)
    shares = {k: np.histogram(vs, edges)[0] / max(len(vs), 1) for k, vs in groups.items() if vs}
    peak = max([float(s.max()) for s in shares.values()] + [1e-9])
    d.line([(left, bottom), (right, bottom)], fill="black")
    d.line([(left, top), (left, bottom)], fill="black")
    x = lambda v: left + (right - left) * (v - lo) / (hi - lo)
    for k, (name, share) in enumerate(shares.items()):
        color = colors[k % len(colors)]
        points = [(x((edges[i] + edges[i + 1]) / 2), bottom - (bottom - top) * s / peak) for i, s in enumerate(share)]
        d.line(points, fill=color, width=2)
        d.text((left + 8 + 170 * k, 18), f"{name} ({len(groups[name])})", fill=color, font=font)
    for v in (lo, (lo + hi) / 2, hi):
        d.text((min(max(x(v) - 12, 2), w - 44), bottom + 4), _fmt(v), fill="black", font=font)
    if threshold is not None and _finite(threshold):
        tx = x(threshold)
        for y in range(top, bottom, 6):
            d.line([(tx, y), (tx, min(y + 3, bottom))], fill=(200, 0, 0))
    return img


def roc_plot(positives: Sequence[float], negatives: Sequence[float], size=(240, 240), title: str = "") -> Image.Image:
    """ROC curve of scores (a higher score means memorized): true- against false-positive rate."""
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.text((6, 4), title, fill="black", font=font)
    left, top, right, bottom = 30, 22, w - 10, h - 20
    d.rectangle([left, top, right, bottom], outline=(170, 170, 170))
    d.line([(left, bottom), (right, top)], fill=(210, 210, 210))
    pos, neg = sorted(positives, reverse=True), sorted(negatives, reverse=True)
    cuts = sorted(set(pos) | set(neg), reverse=True)
    points = [(left, bottom)]
    for c in cuts:
        tpr = sum(p >= c for p in pos) / len(pos)
        fpr = sum(n >= c for n in neg) / len(neg)
        points.append((left + (right - left) * fpr, bottom - (bottom - top) * tpr))
    points.append((right, top))
    d.line(points, fill=(40, 90, 200), width=2)
    d.text((left, bottom + 4), "false-positive rate", fill="black", font=font)
    return img


def copy_evidence_card(generation: Image.Image, training: Optional[Image.Image], lines: Sequence[str],
                       copy: Optional[bool], height: int = 256, width: int = 560) -> Image.Image:
    """A generation beside its nearest training image (same height; small images upscaled without smoothing), with
    `lines` under them (file, caption, similarity, verdict); the verdict's line red for a copy, green for none.
    training None: a grey box (the file could not be read)."""
    def fit(im):
        im = im.convert("RGB")
        w = max(1, round(im.width * height / im.height))
        return im.resize((min(w, (width - 24) // 2), height),
                         Image.NEAREST if im.height < height else Image.Resampling.LANCZOS)
    left = fit(generation)
    right = fit(training) if training is not None else Image.new("RGB", (height, height), (200, 200, 200))
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [(line, k) for k, text in enumerate(lines) for line in _wrap(probe, text, width - 16, font)]
    card = Image.new("RGB", (width, height + 30 + 16 * len(wrapped)), "white")
    d = ImageDraw.Draw(card)
    d.text((8, 4), "generation", fill="black", font=font)
    d.text((16 + left.width, 4), "nearest training image", fill="black", font=font)
    card.paste(left, (8, 20))
    card.paste(right, (16 + left.width, 20))
    colour = {True: (176, 0, 0), False: (0, 112, 0), None: (0, 0, 0)}[copy]
    for row, (text, k) in enumerate(wrapped):
        d.text((8, height + 26 + 16 * row), text, fill=colour if k == len(lines) - 1 else "black", font=font)
    return card
