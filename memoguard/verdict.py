"""From a score trace and a calibration to what the user reads: score, percentile, flagged.

Without a threshold (no calibration of this model, no threshold given) there is no verdict, only
a raw score: the label is "uncalibrated", never "ok", and the text says how to calibrate.
"""
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from .calibration import Calibration
from .score import ScoreTrace, ScoreUnavailable

HOW_TO_CALIBRATE = "calibrate this model to get a verdict (python -m memoguard calibrate --model PATH)"
LABELS = ("ok", "flagged", "uncalibrated", "unavailable")


@dataclass
class Verdict:
    available: bool
    score: float = float("nan")      # the detector's RMS score, mean over the window (what thresholds compare)
    raw: float = float("nan")        # the paper's raw L2 form of the same number
    percentile: float = float("nan")  # among the calibration's benign prompts
    threshold: float = float("nan")
    flagged: bool = False
    reason: str = ""                 # why unavailable, what the verdict rests on, or how to calibrate
    notes: List[str] = field(default_factory=list)  # how this run differs from its calibration
    manual: bool = False             # the threshold was given by the user, not taken from the calibration
    detector: str = ""               # which score (memoguard.score.STEP_DETECTORS)

    @property
    def calibrated(self) -> bool:
        return math.isfinite(self.threshold)

    @property
    def label(self) -> str:
        """One word for infotexts and badges: ok | flagged | uncalibrated | unavailable."""
        if not self.available:
            return "unavailable"
        if not self.calibrated:
            return "uncalibrated"
        return "flagged" if self.flagged else "ok"

    def summary(self) -> str:
        if not self.available:
            return f"score unavailable: {self.reason}"
        if not self.calibrated:
            return f"uncalibrated: score {self.score:.4f} ({self.reason or HOW_TO_CALIBRATE})"
        label = "LIKELY MEMORIZED" if self.flagged else "ok"
        pct = f", {self.percentile:.1f}th percentile of benign" if math.isfinite(self.percentile) else ""
        notes = "".join(f"; note: {n}" for n in self.notes)
        # a threshold set by hand can sit anywhere among the benign scores: say whose it is
        by = " (set by hand)" if self.manual else ""
        return f"{label}: score {self.score:.4f}{pct}, threshold {self.threshold:.4f}{by}{notes}"

    def to_dict(self) -> dict:
        return {**self.__dict__, "label": self.label}


def verdict_for(trace: ScoreTrace, calibration: Optional[Calibration] = None, window: int = 1,
                fpr: float = 0.01, threshold: Optional[float] = None, *, images: int,
                uncalibrated_hint: str = HOW_TO_CALIBRATE, notes: Sequence[str] = ()) -> List[Verdict]:
    """Exactly one verdict per image of the traced batch of `images`, scored or not. An explicit threshold
    overrides the calibration's; `notes` say how the run differs from it. A calibration of another detector
    than the trace's judges nothing (its scores are another quantity)."""
    if calibration is not None and calibration.detector != trace.detector:
        uncalibrated_hint = (f"the calibration holds {calibration.detector} scores, this run was scored by "
                             f"{trace.detector}: calibrate again")
        calibration = None
    try:
        scores = trace.score(window)
        raws = trace.raw_score(window)
    except ScoreUnavailable as e:
        return [Verdict(False, reason=str(e)) for _ in range(images)]
    if len(scores) != images:
        raise ValueError(f"the trace holds {len(scores)} images, not {images}")
    manual = threshold is not None
    if threshold is None and calibration is not None:
        threshold = calibration.threshold(fpr)
    out = []
    for s, r in zip(scores.tolist(), raws.tolist()):
        if not math.isfinite(s):
            out.append(Verdict(False, reason="the model's prediction was not finite (NaN/inf)"))
            continue
        pct = calibration.percentile(s) if calibration is not None else float("nan")
        if threshold is None:
            out.append(Verdict(True, s, r, pct, reason=uncalibrated_hint, detector=trace.detector))
            continue
        out.append(Verdict(True, s, r, pct, float(threshold), bool(s >= threshold), f"first {window} step(s)",
                           list(notes), manual, trace.detector))
    return out
