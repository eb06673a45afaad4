"""From a score trace and a calibration to what the user reads: score, percentile, flagged."""
import math
from dataclasses import dataclass
from typing import List, Optional

from .calibration import Calibration
from .score import ScoreTrace, ScoreUnavailable


@dataclass
class Verdict:
    available: bool
    score: float = float("nan")      # RMS gap, mean over the window (what thresholds compare)
    raw: float = float("nan")        # the paper's raw L2 form of the same number
    percentile: float = float("nan")  # among the calibration's benign prompts
    threshold: float = float("nan")
    flagged: bool = False
    reason: str = ""                 # why unavailable, or what the verdict rests on

    def summary(self) -> str:
        if not self.available:
            return f"score unavailable: {self.reason}"
        label = "LIKELY MEMORIZED" if self.flagged else "ok"
        pct = f", {self.percentile:.1f}th percentile of benign" if math.isfinite(self.percentile) else ""
        thr = f", threshold {self.threshold:.4f}" if math.isfinite(self.threshold) else ""
        return f"{label}: score {self.score:.4f}{pct}{thr}"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def verdict_for(trace: ScoreTrace, calibration: Optional[Calibration] = None, window: int = 1,
                fpr: float = 0.01, threshold: Optional[float] = None) -> List[Verdict]:
    """One verdict per image of the traced batch. An explicit threshold overrides the calibration's."""
    try:
        scores = trace.score(window)
        raws = trace.raw_score(window)
    except ScoreUnavailable as e:
        return [Verdict(False, reason=str(e))]
    if threshold is None and calibration is not None:
        threshold = calibration.threshold(fpr)
    out = []
    for s, r in zip(scores.tolist(), raws.tolist()):
        if not math.isfinite(s):
            out.append(Verdict(False, reason="the model's prediction was not finite (NaN/inf)"))
            continue
        pct = calibration.percentile(s) if calibration is not None else float("nan")
        thr = float("nan") if threshold is None else float(threshold)
        out.append(Verdict(True, s, r, pct, thr, bool(threshold is not None and s >= threshold),
                           f"first {window} step(s)"))
    return out
