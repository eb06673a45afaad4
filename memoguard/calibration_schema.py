"""What a calibration file may hold, checked before anything in it is used.

Calibration files come from anywhere a user copies them from, so every field is checked for its type, its
range and its size, and the first field that is wrong is named in one CalibrationError: a message for the
user, never a traceback, and never a value taken on trust (a score given as a string, a negative window).
"""
import math
from typing import Any

MAX_FILE_BYTES = 16 << 20   # a calibration of 10,000 prompts with a band is well under 1 MiB
MAX_MODELS = 1000
MAX_SCORES = 100_000
MAX_BAND_STEPS = 10_000
MAX_OTHER_LEVELS = 64
MAX_NAME = 1024             # model keys, condition strings (a model path), meta keys
MAX_META_ITEMS = 64
PREDICTIONS = ("eps", "v", "flow", "edm", "x0")

# conditions that change the score, with their kinds; other keys are descriptive (short strings or numbers)
CONDITION_KINDS = {"prediction": "prediction", "noise_level": "positive", "latent": "latent", "steps": "count",
                   "width": "count", "height": "count", "guidance": "guidance", "detector": "name",
                   "embedded_guidance": "guidance"}


def _error(where: str, what: str, value: Any = None, show_value: bool = True):
    from .calibration import CalibrationError  # the error type lives with the calibration it guards
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return CalibrationError(f"calibration field {where} {what}" + (f", got {shown}" if show_value else ""))


def number(value, where: str, low: float = -math.inf, high: float = math.inf, *, above: bool = False) -> float:
    """A finite JSON number (not a bool, not a string) in [low, high] ((low, high] with above=True)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _error(where, "must be a finite number", value)
    if (value <= low if above else value < low) or value > high:
        raise _error(where, f"must be in {'(' if above else '['}{low:g}, {high:g}]", value)
    return float(value)


def whole(value, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _error(where, f"must be a whole number in [{low}, {high}]", value)
    return value


def text(value, where: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_NAME:
        raise _error(where, f"must be a string of at most {MAX_NAME} characters", value)
    return value


def mapping(value, where: str, most: int) -> dict:
    if not isinstance(value, dict):
        raise _error(where, "must be a JSON object", value)
    if len(value) > most:
        raise _error(where, f"has {len(value)} entries; at most {most}", show_value=False)
    for key in value:
        text(key, f"{where} key")
    return value


def numbers(value, where: str, least: int, most: int, low: float = -math.inf, *, above: bool = False) -> list:
    if not isinstance(value, list):
        raise _error(where, "must be a list of numbers", value)
    if not least <= len(value) <= most:
        raise _error(where, f"must hold {least} to {most} numbers, it holds {len(value)}", show_value=False)
    return [number(v, f"{where}[{i}]", low, above=above) for i, v in enumerate(value)]


def _scalar(value, where: str):
    """meta / settings / descriptive conditions: short strings, numbers, booleans or null."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        number(value, where)
    else:
        text(value, where)


def check_conditions(conditions, where: str) -> None:
    mapping(conditions, where, MAX_META_ITEMS)
    for key, value in conditions.items():
        at = f"{where}.{key}"
        kind = CONDITION_KINDS.get(key)
        if kind == "prediction":
            if value is not None and value not in PREDICTIONS:
                raise _error(at, f"must be one of {', '.join(PREDICTIONS)}", value)
        elif kind == "positive":
            number(value, at, 0, above=True)
        elif kind == "latent":
            if not isinstance(value, list) or not 2 <= len(value) <= 4:
                raise _error(at, "must be a list of 2 to 4 sizes", value)
            for i, size in enumerate(value):
                whole(size, f"{at}[{i}]", 1, 1 << 16)
        elif kind == "count":
            whole(value, at, 1, 1 << 16)
        elif kind == "guidance":
            number(value, at, 0, 1000)
        else:
            _scalar(value, at)


def check_band(band, where: str) -> None:
    mapping(band, where, 8)
    unknown = set(band) - {"noise_levels", "median", "high", "fpr", "settings"}
    if unknown:
        raise _error(where, f"has unknown fields {', '.join(sorted(unknown))}", show_value=False)
    for name in ("noise_levels", "median", "high"):
        if name not in band:
            raise _error(f"{where}.{name}", "is missing", show_value=False)
        numbers(band[name], f"{where}.{name}", 2, MAX_BAND_STEPS, 0, above=name == "noise_levels")
    if "fpr" in band:
        number(band["fpr"], f"{where}.fpr", 0, 1, above=True)
    settings = mapping(band.get("settings", {}), f"{where}.settings", MAX_META_ITEMS)
    for key, value in settings.items():
        if key == "guidance":
            number(value, f"{where}.settings.guidance", 0, 1000)
        else:
            _scalar(value, f"{where}.settings.{key}")


def check_entry(entry, where: str) -> None:
    """One model's calibration as stored in a file (Calibration.to_dict)."""
    mapping(entry, where, 16)
    if "scores" not in entry:
        raise _error(f"{where}.scores", "is missing", show_value=False)
    numbers(entry["scores"], f"{where}.scores", 10, MAX_SCORES)  # any sign: a detector's score may be negative
    if "window" in entry:
        whole(entry["window"], f"{where}.window", 1, 1000)
    if "guidance" in entry:
        number(entry["guidance"], f"{where}.guidance", 0, 1000)
    for key, value in mapping(entry.get("meta", {}), f"{where}.meta", MAX_META_ITEMS).items():
        _scalar(value, f"{where}.meta.{key}")
    check_conditions(entry.get("conditions", {}), f"{where}.conditions")
    if entry.get("band") is not None:
        check_band(entry["band"], f"{where}.band")
    others = mapping(entry.get("other_levels", {}), f"{where}.other_levels", MAX_OTHER_LEVELS)
    for level, scores in others.items():
        try:
            ok = math.isfinite(float(level)) and float(level) > 0
        except ValueError:
            ok = False
        if not ok:
            raise _error(f"{where}.other_levels", "keys must be positive noise levels", level)
        numbers(scores, f"{where}.other_levels[{level}]", 10, MAX_SCORES)


def check_file(data, readable_formats) -> None:
    """A whole calibration file: {"format": 1|2, "models": {key: entry}}."""
    if not isinstance(data, dict) or data.get("format") not in readable_formats or "models" not in data:
        from .calibration import CalibrationError
        raise CalibrationError(f"not a MemoGuard calibration file (format {max(readable_formats)})")
    for key, entry in mapping(data["models"], "models", MAX_MODELS).items():
        check_entry(entry, f"models[{key}]")
