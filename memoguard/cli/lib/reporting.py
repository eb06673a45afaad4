"""Writing a scan's results: the HTML report beside a JSONL file, or one CSV / JSON file."""
import csv
import json
import math
from pathlib import Path


def as_float(value) -> float:
    return float("nan") if value is None else float(value)


def score_text(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.4f}"


def html_report(results, summary, calibration, model_name: str, top: int = 20) -> str:
    """Score histogram against the calibration's benign scores, ROC when labelled, the top flagged prompts."""
    import base64
    import html
    from ... import report
    image = lambda img: f"<img src='data:image/png;base64,{base64.b64encode(report.to_png(img)).decode()}'>"
    scores = [as_float(r["score"]) for r in results]
    groups = {"scanned prompts": scores}
    if calibration is not None:
        groups["benign (calibration)"] = calibration.scores
    threshold = summary["threshold"] if math.isfinite(summary["threshold"]) else None
    parts = [f"<p>{len(results)} prompts on {html.escape(model_name)}; "
             f"{'threshold %.4f at %.1f%% false positives' % (threshold, 100 * summary['fpr']) if threshold else 'no calibration: scores only'}.</p>",
             image(report.histogram_plot(groups, threshold, title="first-step score"))]
    if "auc" in summary:
        pos = [as_float(r["score"]) for r in results if r["label"] == 1]
        neg = [as_float(r["score"]) for r in results if r["label"] == 0]
        parts += [f"<p>AUC {summary['auc']:.3f}, TPR at 1% FPR {summary['tpr_at_1pct_fpr']:.3f} "
                  f"({len(pos)} memorized, {len(neg)} not)</p>", image(report.roc_plot(pos, neg, title="ROC"))]
    ranked = sorted(results, key=lambda r: -as_float(r["score"]))[:top]
    rows = "".join(f"<tr><td>{r['index']}</td><td>{as_float(r['score']):.4f}</td>"
                   f"<td class='{'flag' if r['flagged'] else 'ok'}'>{'flagged' if r['flagged'] else ''}</td>"
                   f"<td>{html.escape(r['prompt'])}</td><td>{report.tokens_html([t for t, _ in r['top_tokens']], [s for _, s in r['top_tokens']])}</td></tr>"
                   for r in ranked)
    parts.append(f"<h2>Highest scores</h2><table><tr><th>#</th><th>score</th><th></th><th>prompt</th>"
                 f"<th>top tokens</th></tr>{rows}</table>")
    return report.html_page("MemoGuard scan", parts)


def write_results(path: Path, results, summary) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps({"summary": summary, "results": results}, indent=1))
        return
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "label", "score", "percentile", "flagged", "top_tokens"])
        for r in results:
            w.writerow([r["prompt"], "" if r["label"] is None else r["label"], f"{r['score']:.6f}",
                        f"{r['percentile']:.2f}", int(r["flagged"]), " ".join(f"{t}:{s}" for t, s in r["top_tokens"])])

