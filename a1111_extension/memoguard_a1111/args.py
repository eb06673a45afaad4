"""The script's arguments as the UI and the API hand them over, checked one by one.

The API passes script_args as JSON: numbers may arrive as strings, booleans as "false", and a
typo must not silently turn MemoGuard off or a feature on. Every value is parsed to its type and
range here; an ArgumentError names the argument, its position and what was expected.
"""
import math
from typing import Any, Dict

from memoguard.errors import ArgumentError

from memoguard.explain import METHODS

MITIGATION_MODES = ("off", "always", "auto")
# what the WebUI runs (token removal would re-encode through the WebUI's conditioning functions: not yet)
STRATEGIES = ("mask_padding", "opposite_guidance", "guidance_delay", "remove_tokens", "minimize")  # the radio's order
TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0", "")


def _number(name: str, value: Any, *, integer: bool, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool):
        raise ArgumentError(f"{name} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ArgumentError(f"{name} must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ArgumentError(f"{name} must be a finite number, got {value!r}")
    if integer and value != int(value):
        raise ArgumentError(f"{name} must be a whole number, got {value!r}")
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        raise ArgumentError(f"{name} must be in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}")
    return int(value) if integer else float(value)


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
        return value.strip().lower() in TRUE
    raise ArgumentError(f"{name} must be true or false, got {value!r}")


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ArgumentError(f"{name} must be a string (a file name from models/memoguard, or empty), got {value!r}")
    return value.strip()


def _choice(name: str, value: Any, choices) -> str:
    if not isinstance(value, str) or value.strip().lower() not in choices:
        raise ArgumentError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value.strip().lower()


# name -> parser; the order is the script_args order (script.CONTROLS)
PARSERS = {
    "window": lambda n, v: _number(n, v, integer=True, low=1, high=1000),
    "threshold": lambda n, v: _number(n, v, integer=False, low=0, high=1e6),
    "calibration_file": _text,
    "fpr": lambda n, v: _number(n, v, integer=False, low=0, high=0.5, low_open=True),
    "explain": _boolean,
    "explain_steps": lambda n, v: _number(n, v, integer=True, low=1, high=1000),
    "mitigation": lambda n, v: _choice(n, v, MITIGATION_MODES),
    "target": lambda n, v: _number(n, v, integer=False, low=0, high=1e6),
    "lr": lambda n, v: _number(n, v, integer=False, low=0, high=100, low_open=True),
    "max_iters": lambda n, v: _number(n, v, integer=True, low=0, high=1000),
    "strategy": lambda n, v: _choice(n, v, STRATEGIES),
    "delay": lambda n, v: _number(n, v, integer=False, low=0, high=0.95),
    "explain_method": lambda n, v: _choice(n, v, METHODS),
    "early_scale": lambda n, v: _number(n, v, integer=False, low=-20, high=0),
    "training_images": _text,  # a folder name from models/memoguard_training, checked against that list when used
}


def parse_args(args, names, defaults) -> Dict[str, Any]:
    """{name: parsed value}; missing trailing values (or None) take the defaults. Raises ArgumentError."""
    args = list(args)
    if len(args) > len(names):
        raise ArgumentError(f"got {len(args)} script_args, MemoGuard takes at most {len(names)} "
                            f"({', '.join(names)})")
    values = {}
    for i, (name, default) in enumerate(zip(names, defaults)):
        value = args[i] if i < len(args) and args[i] is not None else default
        try:
            values[name] = PARSERS[name](name, value)
        except ArgumentError as e:
            raise ArgumentError(f"script_args[{i}] {e}") from None
    return values
