"""What the user reads: infotext values and the HTML panel beside the result."""
import html
import math
from dataclasses import dataclass
from typing import List, Optional

from memoguard import MitigationRecord, TokenContributions, Verdict
from memoguard.mitigate import PADDED_NOTE

PLOT_W, PLOT_H = 360, 150
LEFT, RIGHT, TOP, BOTTOM = 46, 12, 10, 30   # margins: room for the tick labels and the axis titles
# Inline, so that the panel looks the same whether the repository or a1111_extension/ is the extension folder.
STYLE = """
.memoguard-panel { display: flex; flex-direction: column; gap: 0.5em; }
.memoguard-evidence-card { max-width: 100%; margin-top: 0.3em; }
.memoguard-image { padding: 0.4em 0.6em; border-radius: 6px; border: 1px solid var(--border-color-primary); }
.memoguard-flagged { border-color: #e4572e; }
.memoguard-verdict { margin-left: 0.5em; }
.memoguard-tokens { margin-top: 0.3em; line-height: 1.8; }
.memoguard-token { padding: 0.1em 0.25em; border-radius: 3px; }
.memoguard-plot { display: block; margin-top: 0.3em; font: 10px sans-serif; }
.memoguard-plot text { fill: var(--body-text-color); }
.memoguard-axis { stroke: var(--body-text-color); stroke-width: 1; opacity: 0.7; }
.memoguard-grid { stroke: var(--body-text-color); stroke-width: 0.5; opacity: 0.15; }
.memoguard-curve { fill: none; stroke: var(--body-text-color); stroke-width: 1.8; }
.memoguard-dot { fill: var(--body-text-color); }
.memoguard-band { fill: #4c9be8; opacity: 0.28; stroke: none; }
.memoguard-band-median { fill: none; stroke: #4c9be8; stroke-width: 1; }
.memoguard-window { fill: #f2c14e; opacity: 0.22; }
.memoguard-threshold { stroke: #e4572e; stroke-dasharray: 4 3; }
.memoguard-error { color: #e4572e; }
.memoguard-note { opacity: 0.8; }
.memoguard-chart-note { opacity: 0.75; font-size: 0.9em; }
"""


@dataclass
class Chart:
    """Everything the per-image plot shows beside the score line."""
    levels: List[float]                 # noise level of each plotted step (for the band)
    steps: List[int]                    # step number (0-based) of each plotted point
    window: int = 1                     # the verdict averages steps [0, window)
    band: Optional[object] = None       # memoguard.calibration.Band, when one applies to this run
    band_note: str = ""                 # why no band is drawn, or what it is


def verdict_label(v: Verdict) -> str:
    return v.label


def mitigation_text(record: Optional[MitigationRecord], position: int) -> Optional[str]:
    """The infotext value: what was changed, so the image can be made again: "MODE padding masked N positions
    BEFORE -> AFTER", "MODE removed WORD ... BEFORE -> AFTER" (the prompt typed without those words, unless marked
    padded), "MODE N iterations BEFORE -> AFTER" (minimize), "MODE guidance delayed K steps", "MODE guidance S for
    K steps" (opposite guidance), "MODE not needed (first-step score X under the threshold T)" or "MODE not run
    (why)"."""
    if record is None:
        return None
    if not record.ran:
        return f"{record.mode} not run ({record.reason})"
    if not record.image_iterations[position]:
        return f"{record.mode} not needed ({record.left_alone(position)})"
    before, after = record.before[position], record.after[position]
    if record.strategy == "guidance_delay":
        return f"{record.mode} guidance delayed {record.delay_steps} steps"
    if record.strategy == "opposite_guidance":
        return f"{record.mode} guidance {record.early_scale:g} for {record.delay_steps} steps"
    if record.strategy == "mask_padding":
        return f"{record.mode} padding masked {record.masked[position]} positions {before:.4f} -> {after:.4f}"
    if record.strategy == "remove_tokens":
        padded = f" ({PADDED_NOTE})" if record.is_padded(position) else ""
        return f"{record.mode} removed {' '.join(record.removed[position])} {before:.4f} -> {after:.4f}{padded}"
    return f"{record.mode} {record.iterations} iterations {before:.4f} -> {after:.4f}"


def explanation_method(explanations: List[TokenContributions], note: str = "") -> Optional[str]:
    """The method's name, and why the prompt was not re-encoded where that is the reason for the method."""
    if not explanations:
        return None
    return explanations[0].method_name + (f" (not re-encoded: {note})" if note else "")


def top_tokens_text(explanations: List[TokenContributions], k: int = 3) -> Optional[str]:
    if not explanations:
        return None
    parts = [f"{tok} {share:.0%}" for c in explanations for tok, share in c.top(k)]
    return " ".join(parts) or None


def _nice_top(value: float) -> float:
    """A round axis maximum at or above value (1, 2, 2.5, 5 x 10^k)."""
    if not value > 0:
        return 1.0
    exp = math.floor(math.log10(value))
    for m in (1, 2, 2.5, 5, 10):
        if m * 10 ** exp >= value * 1.0001:
            return m * 10 ** exp
    return 10 ** (exp + 1)


def _fmt(v: float) -> str:
    return f"{v:.3g}" if v >= 0.01 or v == 0 else f"{v:.1e}"


def band_values(chart: Chart):
    """(median, high) per plotted step, None where the band does not reach the step's noise level."""
    if chart.band is None:
        return [None] * len(chart.levels)
    return [chart.band.at(level) if level is not None and math.isfinite(level) else None for level in chart.levels]


def score_plot(gaps: List[float], threshold: float, chart: Chart) -> str:
    """SVG: score per sampling step with axes, ticks and values; the benign band under the line; the verdict window."""
    finite = [g for g in gaps if math.isfinite(g)]
    if not finite:
        return ""
    bands = band_values(chart)
    tops = finite + [b[1] for b in bands if b] + ([threshold] if math.isfinite(threshold) else [])
    top = _nice_top(max(tops))
    n = len(gaps)
    steps = chart.steps if len(chart.steps) == n else list(range(n))
    first, last = 1, max(max(steps) + 1, chart.window, 2)
    span_x = PLOT_W - LEFT - RIGHT
    x = lambda step: LEFT + (step + 1 - first) * span_x / (last - first)   # step: 0-based
    y = lambda g: TOP + (PLOT_H - TOP - BOTTOM) * (1 - g / top)
    out = [f'<svg class="memoguard-plot" width="{PLOT_W}" height="{PLOT_H}" viewBox="0 0 {PLOT_W} {PLOT_H}" '
           f'role="img"><title>MemoGuard score per sampling step</title>']
    # verdict window: steps 1..window
    x0, x1 = x(0) - span_x / (last - first) / 2, x(chart.window - 1) + span_x / (last - first) / 2
    x0, x1 = max(LEFT, x0), min(PLOT_W - RIGHT, x1)
    out.append(f'<rect class="memoguard-window" x="{x0:.1f}" y="{TOP}" width="{x1 - x0:.1f}" '
               f'height="{PLOT_H - TOP - BOTTOM}"><title>verdict window: step{"s 1-" + str(chart.window) if chart.window > 1 else " 1"}</title></rect>')
    # y grid, ticks and values
    for k in range(5):
        v = top * k / 4
        out.append(f'<line class="memoguard-grid" x1="{LEFT}" x2="{PLOT_W - RIGHT}" y1="{y(v):.1f}" y2="{y(v):.1f}"/>')
        out.append(f'<text x="{LEFT - 4}" y="{y(v) + 3:.1f}" text-anchor="end">{_fmt(v)}</text>')
    # x ticks: about 6 labelled steps
    stride = max(1, math.ceil((last - first + 1) / 6))
    ticks = sorted(set(list(range(first, last + 1, stride)) + [last]))
    for s in ticks:
        px = x(s - 1)
        out.append(f'<line class="memoguard-axis" x1="{px:.1f}" x2="{px:.1f}" y1="{PLOT_H - BOTTOM}" y2="{PLOT_H - BOTTOM + 3}"/>')
        out.append(f'<text x="{px:.1f}" y="{PLOT_H - BOTTOM + 13}" text-anchor="middle">{s}</text>')
    out.append(f'<line class="memoguard-axis" x1="{LEFT}" x2="{PLOT_W - RIGHT}" y1="{PLOT_H - BOTTOM}" y2="{PLOT_H - BOTTOM}"/>')
    out.append(f'<line class="memoguard-axis" x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{PLOT_H - BOTTOM}"/>')
    out.append(f'<text x="{LEFT + span_x / 2:.1f}" y="{PLOT_H - 3}" text-anchor="middle">sampling step</text>')
    out.append(f'<text x="10" y="{TOP + (PLOT_H - TOP - BOTTOM) / 2:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 10 {TOP + (PLOT_H - TOP - BOTTOM) / 2:.1f})">score (RMS)</text>')
    # band: one polygon per run of consecutive steps the band covers, median line on top of it
    runs, current = [], []
    for i, b in enumerate(bands):
        if b is None:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(i)
    if current:
        runs.append(current)
    for run in runs:
        if len(run) == 1:
            i = run[0]
            out.append(f'<line class="memoguard-band-median" x1="{x(steps[i]) - 3:.1f}" x2="{x(steps[i]) + 3:.1f}" '
                       f'y1="{y(bands[i][1]):.1f}" y2="{y(bands[i][1]):.1f}"/>')
            continue
        upper = [f"{x(steps[i]):.1f},{y(bands[i][1]):.1f}" for i in run]
        lower = [f"{x(steps[i]):.1f},{y(bands[i][0]):.1f}" for i in reversed(run)]
        out.append(f'<polygon class="memoguard-band" points="{" ".join(upper + lower)}">'
                   f'<title>benign band: median to the level 1 in 100 benign runs exceed</title></polygon>')
        out.append(f'<polyline class="memoguard-band-median" points="{" ".join(reversed(lower))}"/>')
    if math.isfinite(threshold) and threshold <= top:
        out.append(f'<line x1="{LEFT}" x2="{PLOT_W - RIGHT}" y1="{y(threshold):.1f}" y2="{y(threshold):.1f}" '
                   f'class="memoguard-threshold"><title>threshold {threshold:.4f}</title></line>')
        out.append(f'<text x="{PLOT_W - RIGHT - 2}" y="{y(threshold) - 3:.1f}" text-anchor="end" '
                   f'style="fill: #e4572e">threshold {threshold:.4f}</text>')
    points = [(x(steps[i]), y(g), g, steps[i]) for i, g in enumerate(gaps) if math.isfinite(g)]
    if len(points) > 1:
        out.append('<polyline class="memoguard-curve" points="' +
                   " ".join(f"{px:.1f},{py:.1f}" for px, py, _, _ in points) + '"/>')
    for px, py, g, s in points:
        out.append(f'<circle class="memoguard-dot" cx="{px:.1f}" cy="{py:.1f}" r="2"><title>step {s + 1}: '
                   f'{g:.4f}</title></circle>')
    out.append("</svg>")
    return "".join(out)


def _tokens_html(c: TokenContributions) -> str:
    top = max(c.shares, default=0.0) or 1.0
    spans = [f'<span class="memoguard-token" style="background: rgba(255, 80, 0, {0.85 * share / top:.2f})" '
             f'title="{share:.1%} of the contribution">{html.escape(tok)}</span>'
             for tok, share in zip(c.tokens, c.shares)]
    return '<div class="memoguard-tokens">' + " ".join(spans) + "</div>"


def image_panel(title: str, verdict: Verdict, gaps: List[float], explanations: List[TokenContributions],
                mitigation: Optional[str], chart: Optional[Chart] = None, explain_note: str = "",
                evidence: Optional[tuple] = None) -> str:
    """evidence: (infotext line, card PNG as base64 or None) of the image's copy evidence."""
    chart = chart or Chart([None] * len(gaps), list(range(len(gaps))))
    status = verdict_label(verdict)
    parts = [f'<div class="memoguard-image memoguard-{status}"><b>{html.escape(title)}</b> '
             f'<span class="memoguard-verdict">{html.escape(verdict.summary())}</span>']
    plot = score_plot(gaps, verdict.threshold, chart)
    parts.append(plot)
    if plot:
        note = chart.band_note
        if chart.band is not None and not any(band_values(chart)):
            note = "no band: this run's noise levels are outside the calibrated schedule"
        legend = "shaded yellow: verdict window" + (f"; {note}" if note else "")
        parts.append(f'<div class="memoguard-chart-note">{html.escape(legend)}</div>')
    parts += [_tokens_html(c) for c in explanations]
    if explanations:
        parts.append(f'<div class="memoguard-chart-note">tokens: '
                     f'{html.escape(explanation_method(explanations, explain_note))}</div>')
    if mitigation:
        parts.append(f'<div class="memoguard-mitigation">mitigation: {html.escape(mitigation)}</div>')
    if evidence is not None:
        line, card = evidence
        parts.append(f'<div class="memoguard-evidence">copy evidence: {html.escape(line or "not judged")}</div>')
        if card:
            parts.append(f'<img class="memoguard-evidence-card" alt="nearest training image" '
                         f'src="data:image/png;base64,{card}">')
    parts.append("</div>")
    return "".join(parts)


def panel(images: List[str], errors: List[str], notes: List[str]) -> str:
    body = "".join(images)
    body += "".join(f'<div class="memoguard-error">{html.escape(e)}</div>' for e in errors)
    body += "".join(f'<div class="memoguard-note">{html.escape(n)}</div>' for n in notes)
    return f'<style>{STYLE}</style><div class="memoguard-panel">{body}</div>'
