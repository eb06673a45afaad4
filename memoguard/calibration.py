"""Calibration: what score is unusual for *this* model, from scores of benign prompts.

A calibration holds the sorted first-step (or windowed) RMS scores of ordinary prompts' generations on one
model at one setting, by one detector (memoguard.score; recorded in `conditions`). It answers "which percentile of benign prompts is this score" and "what
threshold gives a false-positive rate of f". It records what it was measured at (`conditions`:
the model's prediction type, the noise level of the first step, the latent size, the host), so a
run that differs in a way that changes the score can say so, and optionally a `Band`: the benign
score along a whole sampling run, for charts. Files are small JSON, keyed by model
(memoguard.identity's weights fingerprint), so one file can serve several checkpoints; a
`CalibrationStore` keeps one file per model in a folder.

Noise level: sigma / alpha of x_t = alpha * x0 + sigma * eps, the noise-to-signal ratio. It is the
k-diffusion sigma of ComfyUI and the WebUI, sqrt((1 - abar_t) / abar_t) of a timestep t, and the sigma of a
rectified-flow model read as x = x0 + sigma * v (memoguard.score): one coordinate for every host and scheduler.
"""
import bisect
import json
import math
import os
from statistics import NormalDist
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .calibration_schema import MAX_FILE_BYTES, check_entry, check_file
from .errors import MemoGuardError

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
NOISE_TOLERANCE = 0.02   # relative difference in first-step noise level that changes the score


# Seeds `calibrate` scores each prompt at, each generation a benign score: the nominal 1 % then holds for held-out
# single generations on both evaluation models (1.0-1.1 %; one seed a prompt: up to 4.6 %, the mean over four seeds:
# up to 2.0 %; BENCHMARKS.md, calibration_fpr)
CALIBRATION_SEEDS = 4


class CalibrationError(MemoGuardError, ValueError):
    pass


@dataclass
class Band:
    """The benign score along a sampling run: per step its noise level, the median and an upper edge.

    The upper edge is where a share `fpr` of benign runs lies above at that step (log-normal fit of the
    benign runs' gaps per step: exp(mean + z x sd) of the logs, z the (1 - fpr) normal quantile), the same
    rate at every step and the verdict's own false-positive rate by default: "above the band" means
    equally unusual at every step. (A run of many steps crosses a 1 % edge somewhere more often than 1 %
    of the time; bench reports both rates.) Indexed by noise level rather than step number, so that
    `at()` can place the band under a run with another step count or scheduler (log-linear in the noise
    level between the measured steps). `settings` records what the band was sampled with (sampler, steps,
    guidance, prompts): the trajectory depends on the guidance scale above all.
    """
    noise_levels: List[float]   # noisiest first
    median: List[float]
    high: List[float]
    fpr: float = 0.01
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.noise_levels)
        if n < 2 or len(self.median) != n or len(self.high) != n:
            raise CalibrationError(f"a band needs matching noise levels, medians and upper edges for at least 2 "
                                   f"steps (got {n}, {len(self.median)}, {len(self.high)})")
        if any(not (a > b) for a, b in zip(self.noise_levels, self.noise_levels[1:])) or self.noise_levels[-1] <= 0:
            raise CalibrationError("a band's noise levels must be positive and strictly decreasing")

    @classmethod
    def from_runs(cls, noise_levels: Sequence[float], gaps: np.ndarray, fpr: float = 0.01,
                  settings: Optional[dict] = None) -> "Band":
        """gaps: (runs, steps) RMS gaps of benign generations sampled on the schedule `noise_levels`.
        The last step of a schedule may sit at noise level 0 (the clean image): it is left out."""
        if not 0 < fpr < 1:
            raise CalibrationError(f"a band's false-positive rate must be in (0, 1), got {fpr}")
        gaps = np.asarray(gaps, float)
        if gaps.ndim != 2 or gaps.shape[0] < 2:
            raise CalibrationError(f"a band needs the gaps of at least 2 benign runs, got shape {gaps.shape}")
        keep = [i for i, s in enumerate(noise_levels) if s > 0]
        gaps = gaps[:, keep]
        logs = np.log(np.maximum(gaps, 1e-12))
        z = NormalDist().inv_cdf(1 - fpr)
        high = np.exp(logs.mean(axis=0) + z * logs.std(axis=0, ddof=1))
        return cls([float(noise_levels[i]) for i in keep], np.median(gaps, axis=0).tolist(), high.tolist(), fpr,
                   {**(settings or {}), "runs": int(gaps.shape[0])})

    def at(self, noise_level: float) -> Optional[Tuple[float, float]]:
        """(median, high) at a noise level, or None outside the measured range."""
        lo, hi = self.noise_levels[-1], self.noise_levels[0]
        if not math.isfinite(noise_level) or not lo * (1 - NOISE_TOLERANCE) <= noise_level <= hi * (1 + NOISE_TOLERANCE):
            return None
        xs = np.log(self.noise_levels[::-1])
        x = math.log(min(max(noise_level, lo), hi))
        return float(np.interp(x, xs, self.median[::-1])), float(np.interp(x, xs, self.high[::-1]))

    def serves(self, guidance: Optional[float]) -> bool:
        """Whether runs at this guidance scale may be drawn against the band (the trajectory depends on it)."""
        measured = self.settings.get("guidance")
        return guidance is None or measured is None or math.isclose(float(guidance), float(measured), rel_tol=1e-3)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Calibration:
    model_key: str
    scores: List[float]            # benign RMS scores, any order (kept sorted)
    window: int = 1                # steps the scores average over
    guidance: float = 7.5
    meta: dict = field(default_factory=dict)
    conditions: dict = field(default_factory=dict)   # prediction, noise_level, latent, host (see check())
    band: Optional[Band] = None
    # the same benign prompts' first-step scores at other first-step noise levels (other samplers/schedulers)
    other_levels: Dict[str, List[float]] = field(default_factory=dict)

    def __post_init__(self):
        finite = sorted(float(s) for s in self.scores if math.isfinite(float(s)))
        if len(finite) < 10:
            raise CalibrationError(f"a calibration needs at least 10 finite benign scores, got {len(finite)}")
        self.scores = finite
        self.other_levels = {str(k): sorted(float(x) for x in v if math.isfinite(float(x)))
                             for k, v in self.other_levels.items()}

    def percentile(self, score: float) -> float:
        """Share of benign scores strictly below `score`, in percent."""
        if not math.isfinite(score):
            return float("nan")
        return 100.0 * bisect.bisect_left(self.scores, score) / len(self.scores)

    @property
    def detector(self) -> str:
        """What the scores are (memoguard.score.DETECTORS); files made before detectors were recorded hold the
        magnitude."""
        return self.conditions.get("detector", "magnitude")

    @property
    def median(self) -> float:
        """The typical benign score: a natural target for mitigation."""
        return float(np.median(self.scores))

    def threshold(self, fpr: float = 0.01) -> float:
        """The score from which a run is flagged, at a benign false-positive rate of at most `fpr`."""
        if not 0 < fpr < 1:
            raise CalibrationError(f"false-positive rate must be in (0, 1), got {fpr}")
        return threshold_at_fpr(self.scores, fpr)

    def at_noise_level(self, noise_level: Optional[float]) -> "Calibration":
        """This calibration as measured at the first-step noise level nearest `noise_level` (itself when it
        recorded no other level within tolerance)."""
        level = self.conditions.get("noise_level")
        if noise_level is None or not level or abs(noise_level - level) <= NOISE_TOLERANCE * level:
            return self
        for other, scores in self.other_levels.items():
            if abs(noise_level - float(other)) <= NOISE_TOLERANCE * float(other):
                rest = {k: v for k, v in self.other_levels.items() if k != other}
                rest[repr(float(level))] = self.scores
                return replace(self, scores=scores, conditions={**self.conditions, "noise_level": float(other)},
                               other_levels=rest)
        return self

    def check(self, prediction: Optional[str] = None, noise_level: Optional[float] = None,
              latent: Optional[Sequence[int]] = None, guidance: Optional[float] = None,
              window: Optional[int] = None, embedded_guidance: Optional[float] = None) -> List[str]:
        """What differs between this run and the calibration in a way that changes the score (empty: none).
        Conditions the calibration did not record are not compared; `guidance` is compared with the band's,
        `window` (the steps the verdict averages) with the calibration's, `embedded_guidance` (a guidance-distilled
        model's input, Flux's FluxGuidance: it changes every prediction, the first step's too) with the one the
        calibration encoded. Every host and the CLI ask this."""
        c, out = self.conditions, []
        recorded = c.get("embedded_guidance")
        if embedded_guidance is not None and recorded is not None and abs(embedded_guidance - recorded) > 1e-6:
            out.append(f"calibrated at embedded guidance {recorded:g} (Flux guidance), this run uses "
                       f"{embedded_guidance:g}")
        if window is not None and window != self.window:
            out.append(f"calibrated on {self.window} step(s), this verdict averages {window}")
        if prediction and c.get("prediction") and prediction != c["prediction"]:
            out.append(f"calibrated for {c['prediction']}-prediction, this run samples {prediction}-prediction")
        level = c.get("noise_level")
        if noise_level is not None and level and abs(noise_level - level) > NOISE_TOLERANCE * level:
            out.append(f"calibrated at a first-step noise level of {level:.4g}, this run starts at "
                       f"{noise_level:.4g} (another sampler or scheduler)")
        if latent and c.get("latent") and list(latent)[-2:] != list(c["latent"])[-2:]:
            out.append(f"calibrated at latent size {'x'.join(map(str, c['latent'][-2:]))}, this run is "
                       f"{'x'.join(map(str, list(latent)[-2:]))}")
        if self.band is not None and not self.band.serves(guidance):
            out.append(f"benign band not drawn: it was sampled at cfg {self.band.settings['guidance']:g}, "
                       f"this run uses cfg {guidance:g}")
        return out

    def to_dict(self) -> dict:
        return {"scores": self.scores, "window": self.window, "guidance": self.guidance, "meta": self.meta,
                "conditions": self.conditions, "band": self.band.to_dict() if self.band is not None else None,
                "other_levels": self.other_levels}

    @classmethod
    def from_dict(cls, model_key: str, entry: dict) -> "Calibration":
        check_entry(entry, f"models[{model_key}]")
        try:
            band = entry.get("band")
            return cls(model_key, entry["scores"], entry.get("window", 1), entry.get("guidance", 7.5),
                       entry.get("meta", {}), entry.get("conditions", {}), Band(**band) if band else None,
                       entry.get("other_levels", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise CalibrationError(f"the calibration of {model_key!r} is malformed: {e}") from None

    def save(self, path) -> None:
        """Add or replace this model's entry in a calibration file."""
        path = Path(path)
        data = _read(path) if path.exists() else {"format": FORMAT_VERSION, "models": {}}
        data["format"] = FORMAT_VERSION
        data["models"][self.model_key] = self.to_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)  # never leave a half-written file behind

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
        return cls.from_dict(model_key, models[model_key])

    @classmethod
    def find(cls, path, model_key: str) -> Optional["Calibration"]:
        """This model's entry in a file, None when the file has none; a broken file is an error."""
        data = _read(Path(path))
        return cls.from_dict(model_key, data["models"][model_key]) if model_key in data["models"] else None


def threshold_at_fpr(scores: Sequence[float], fpr: float) -> float:
    """A threshold that flags at most `fpr` of these benign scores, halfway between the highest one it lets
    through and the next: no benign score sits on it, so a change in the last float bits of a score (another
    thread count, batch or device) never flips that prompt's verdict. Above the highest score, by half the last
    gap."""
    s = np.sort(np.asarray(scores, float))
    k = min(len(s) - 1, math.ceil((1 - fpr) * len(s)) - 1)
    above = s[k + 1] if k + 1 < len(s) else s[k] + (s[k] - s[k - 1] if k > 0 else abs(s[k]))
    return float((s[k] + above) / 2) if above > s[k] else float(np.nextafter(s[k], np.inf))


def keys_in(path) -> List[str]:
    """The model keys a calibration file holds."""
    return list(_read(Path(path))["models"])


def _read(path: Path) -> dict:
    """A calibration file, every field checked (calibration_schema) before any of it is used."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise CalibrationError(f"calibration file {path} has {size:,} bytes; a calibration has at most "
                                   f"{MAX_FILE_BYTES:,}")
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except FileNotFoundError:
        raise CalibrationError(f"calibration file not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        if isinstance(e, CalibrationError):
            raise
        raise CalibrationError(f"calibration file {path} is unreadable: {e}") from None
    try:
        check_file(data, READABLE_FORMATS)
    except CalibrationError as e:
        raise CalibrationError(f"{path}: {e}") from None
    return data


def _no_constant(name):
    raise ValueError(f"{name} is not a number JSON allows")


BUNDLED_FILE = resources.files("memoguard.assets").joinpath("calibration.json")


class CalibrationStore:
    """Calibrations kept as one file per model key in folders (the hosts' models/memoguard, the CLI's
    default folder); the first folder is where new ones are saved. Lookups fall back to the calibration
    shipped for the bundled tiny model."""

    BUNDLED = "bundled with MemoGuard for its tiny model"

    def __init__(self, folder, *more):
        self.folders = [Path(f).expanduser() for f in (folder, *more)]

    def path_for(self, model_key: str) -> Path:
        return self.folders[0] / f"{model_key}.json"

    def save(self, calibration: Calibration) -> Path:
        path = self.path_for(calibration.model_key)
        calibration.save(path)
        return path

    def locate(self, model_key: str) -> Tuple[Optional[Calibration], str]:
        """(calibration of this model key or None, where it came from: a path or BUNDLED). A corrupt file
        raises CalibrationError (never skipped: a user who calibrated must learn the result is unusable)."""
        for folder in self.folders:
            path = folder / f"{model_key}.json"
            if path.is_file():
                found = Calibration.find(path, model_key)
                if found is None:
                    raise CalibrationError(f"{path} is named after {model_key} but does not hold it")
                return found, str(path)
        with resources.as_file(BUNDLED_FILE) as bundled:
            found = Calibration.find(bundled, model_key)
        return found, self.BUNDLED if found is not None else ""

    def find(self, model_key: str) -> Optional[Calibration]:
        return self.locate(model_key)[0]


def default_store_folder() -> Path:
    """Where the CLI keeps calibrations: $MEMOGUARD_CALIBRATIONS, else ~/.cache/memoguard/calibrations."""
    return Path(os.environ.get("MEMOGUARD_CALIBRATIONS", Path.home() / ".cache" / "memoguard" / "calibrations"))


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
