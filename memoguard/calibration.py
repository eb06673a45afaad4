"""Calibration: what score is unusual for *this* model, from scores of benign prompts.

A calibration holds the sorted first-step (or windowed) RMS scores of ordinary prompts on one
model at one setting. It answers "which percentile of benign prompts is this score" and "what
threshold gives a false-positive rate of f". Files are small JSON, keyed by model, so one file
can serve several checkpoints.
"""
import bisect
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import List, Sequence

import numpy as np

FORMAT_VERSION = 1


class CalibrationError(ValueError):
    pass


@dataclass
class Calibration:
    model_key: str
    scores: List[float]            # benign RMS scores, any order (kept sorted)
    window: int = 1                # steps the scores average over
    guidance: float = 7.5
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        finite = sorted(float(s) for s in self.scores if math.isfinite(float(s)))
        if len(finite) < 10:
            raise CalibrationError(f"a calibration needs at least 10 finite benign scores, got {len(finite)}")
        self.scores = finite

    def percentile(self, score: float) -> float:
        """Share of benign scores strictly below `score`, in percent."""
        if not math.isfinite(score):
            return float("nan")
        return 100.0 * bisect.bisect_left(self.scores, score) / len(self.scores)

    @property
    def median(self) -> float:
        """The typical benign score: a natural target for mitigation."""
        return float(np.median(self.scores))

    def threshold(self, fpr: float = 0.01) -> float:
        """Smallest score flagged at a benign false-positive rate of at most `fpr`."""
        if not 0 < fpr < 1:
            raise CalibrationError(f"false-positive rate must be in (0, 1), got {fpr}")
        k = min(len(self.scores) - 1, math.ceil((1 - fpr) * len(self.scores)) - 1)
        return float(np.nextafter(self.scores[k], np.inf))

    def to_dict(self) -> dict:
        return {"scores": self.scores, "window": self.window, "guidance": self.guidance, "meta": self.meta}

    def save(self, path) -> None:
        """Add or replace this model's entry in a calibration file."""
        path = Path(path)
        data = _read(path) if path.exists() else {"format": FORMAT_VERSION, "models": {}}
        data["models"][self.model_key] = self.to_dict()
        path.write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, path, model_key: str = None) -> "Calibration":
        data = _read(Path(path))
        models = data["models"]
        if model_key is None:
            if len(models) != 1:
                raise CalibrationError(f"{path} holds {len(models)} models ({', '.join(models)}); name one")
            model_key = next(iter(models))
        if model_key not in models:
            raise CalibrationError(f"{path} has no calibration for model {model_key!r} "
                                   f"(it has: {', '.join(models) or 'none'})")
        entry = models[model_key]
        return cls(model_key, entry["scores"], entry.get("window", 1), entry.get("guidance", 7.5), entry.get("meta", {}))


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CalibrationError(f"calibration file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CalibrationError(f"calibration file {path} is unreadable: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION or not isinstance(data.get("models"), dict):
        raise CalibrationError(f"{path} is not a MemoGuard calibration file (format {FORMAT_VERSION})")
    return data


def default_benign_prompts() -> List[str]:
    """The few hundred ordinary prompts shipped for calibrating a user's own model."""
    text = resources.files("memoguard.assets").joinpath("benign_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def roc_auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """Probability that a positive outscores a negative (ties count half)."""
    pos, neg = np.asarray(positives, float), np.asarray(negatives, float)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def roc_curve(positives: Sequence[float], negatives: Sequence[float]):
    """(fpr, tpr) at every distinct threshold, highest threshold first, starting at (0, 0)."""
    scores = np.concatenate([np.asarray(positives, float), np.asarray(negatives, float)])
    labels = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_run = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
    tps = np.cumsum(labels)[last_of_run]
    fps = (last_of_run + 1) - tps
    return np.r_[0, fps / max(len(negatives), 1)], np.r_[0, tps / max(len(positives), 1)]


def tpr_at_fpr(positives: Sequence[float], negatives: Sequence[float], fpr: float = 0.01) -> float:
    """As the paper's notebook: tpr at the last ROC point whose fpr is below `fpr`."""
    fprs, tprs = roc_curve(positives, negatives)
    below = np.nonzero(fprs < fpr)[0]
    return float(tprs[below[-1]]) if len(below) else 0.0
