"""What the user reads: infotext values and the HTML panel beside the result."""
import html
import math
from typing import List, Optional

from memoguard import MitigationRecord, TokenContributions, Verdict

PLOT_W, PLOT_H = 220, 60
# Inline, so that the panel looks the same whether the repository or a1111_extension/ is the extension folder.
STYLE = """
.memoguard-panel { display: flex; flex-direction: column; gap: 0.5em; }
.memoguard-image { padding: 0.4em 0.6em; border-radius: 6px; border: 1px solid var(--border-color-primary); }
.memoguard-flagged { border-color: #e4572e; }
.memoguard-verdict { margin-left: 0.5em; }
.memoguard-tokens { margin-top: 0.3em; line-height: 1.8; }
.memoguard-token { padding: 0.1em 0.25em; border-radius: 3px; }
.memoguard-plot { display: block; margin-top: 0.3em; }
.memoguard-curve { fill: none; stroke: var(--body-text-color); stroke-width: 1.5; }
.memoguard-threshold { stroke: #e4572e; stroke-dasharray: 4 3; }
.memoguard-error { color: #e4572e; }
.memoguard-note { opacity: 0.8; }
"""


def verdict_label(v: Verdict) -> str:
    if not v.available:
        return "unavailable"
    return "flagged" if v.flagged else "ok"


def mitigation_text(record: Optional[MitigationRecord], position: int) -> Optional[str]:
    if record is None:
        return None
    if not record.ran:
        return f"{record.mode} not run ({record.reason})"
    before, after = record.before[position], record.after[position]
    return f"{record.mode} {record.iterations} iterations {before:.4f} -> {after:.4f}"


def top_tokens_text(explanations: List[TokenContributions], k: int = 3) -> Optional[str]:
    if not explanations:
        return None
    parts = [f"{tok} {share:.0%}" for c in explanations for tok, share in c.top(k)]
    return " ".join(parts) or None


def _score_plot(gaps: List[float], threshold: float) -> str:
    finite = [g for g in gaps if math.isfinite(g)]
    if len(finite) < 2:
        return ""
    top = max(finite + ([threshold] if math.isfinite(threshold) else [])) or 1.0
    x = lambda i: 4 + i * (PLOT_W - 8) / (len(gaps) - 1)
    y = lambda g: PLOT_H - 4 - (PLOT_H - 8) * g / top
    points = " ".join(f"{x(i):.1f},{y(g):.1f}" for i, g in enumerate(gaps) if math.isfinite(g))
    line = (f'<line x1="0" x2="{PLOT_W}" y1="{y(threshold):.1f}" y2="{y(threshold):.1f}" class="memoguard-threshold"/>'
            if math.isfinite(threshold) else "")
    return (f'<svg class="memoguard-plot" width="{PLOT_W}" height="{PLOT_H}" viewBox="0 0 {PLOT_W} {PLOT_H}">'
            f'<title>score per sampling step (first step left)</title>{line}'
            f'<polyline points="{points}" class="memoguard-curve"/></svg>')


def _tokens_html(c: TokenContributions) -> str:
    top = max(c.shares, default=0.0) or 1.0
    spans = [f'<span class="memoguard-token" style="background: rgba(255, 80, 0, {0.85 * share / top:.2f})" '
             f'title="{share:.1%} of the contribution">{html.escape(tok)}</span>'
             for tok, share in zip(c.tokens, c.shares)]
    return '<div class="memoguard-tokens">' + " ".join(spans) + "</div>"


def image_panel(title: str, verdict: Verdict, gaps: List[float], explanations: List[TokenContributions],
                mitigation: Optional[str]) -> str:
    status = verdict_label(verdict)
    parts = [f'<div class="memoguard-image memoguard-{status}"><b>{html.escape(title)}</b> '
             f'<span class="memoguard-verdict">{html.escape(verdict.summary())}</span>']
    parts.append(_score_plot(gaps, verdict.threshold))
    parts += [_tokens_html(c) for c in explanations]
    if mitigation:
        parts.append(f'<div class="memoguard-mitigation">mitigation: {html.escape(mitigation)}</div>')
    parts.append("</div>")
    return "".join(parts)


def panel(images: List[str], errors: List[str], notes: List[str]) -> str:
    body = "".join(images)
    body += "".join(f'<div class="memoguard-error">{html.escape(e)}</div>' for e in errors)
    body += "".join(f'<div class="memoguard-note">{html.escape(n)}</div>' for n in notes)
    return f'<style>{STYLE}</style><div class="memoguard-panel">{body}</div>'
