"""The commands' inputs: prompt files (txt, CSV, JSONL with labels), the model's calibration, the dtype."""
import csv
import json
from pathlib import Path
from typing import Optional

import torch

from ...calibration import CalibrationError, default_store_folder
from ...calibration_lookup import CalibrationLookup
from ...errors import MemoGuardError


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


_TRUE, _FALSE = {"1", "true", "yes", "memorized"}, {"0", "false", "no", ""}


class PromptFileError(MemoGuardError, ValueError):
    pass


def _label(value, where: str):
    text = str(value).strip().lower()
    if text in _TRUE:
        return 1
    if text in _FALSE:
        return 0 if text else None
    raise PromptFileError(f"{where}: label {value!r} is not 1/0/true/false")


def read_prompts(path: Path):
    """[(prompt, label or None)] from a txt, CSV or JSONL file, with clear errors."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptFileError(f"prompt file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PromptFileError(f"cannot read prompt file {path}: {e}") from None
    suffix = Path(path).suffix.lower()
    rows = []
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise PromptFileError(f"{path}: a CSV needs a 'prompt' column (has: {reader.fieldnames})")
        for i, row in enumerate(reader, start=2):
            rows.append((row["prompt"] or "", _label(row.get("label", ""), f"{path}:{i}")))
    elif suffix in (".jsonl", ".ndjson"):
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{path}:{i}: not JSON: {e}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise PromptFileError(f"{path}:{i}: each line needs a string field 'prompt'")
            rows.append((obj["prompt"], _label(obj.get("label", ""), f"{path}:{i}")))
    else:
        rows = [(line.strip(), None) for line in text.splitlines() if line.strip()]
    if not rows:
        raise PromptFileError(f"{path}: no prompts found")
    return rows


def check_dtype(device: str, dtype: str) -> None:
    if device == "cpu" and dtype != "fp32":
        raise MemoGuardError(f"--dtype {dtype} needs a GPU (--device cuda); on the CPU use fp32")


def load_calibration(path, model, steps: int, detector: Optional[str] = None, sampler_run: bool = True):
    """The model's calibration (the file `path`, else the default store or the bundled preset) at the noise level
    of the first step of a `steps` schedule, and notes on how this run differs from it; (None, []) if none was
    made for this model. A file that is refused or broken raises CalibrationError (the CLI stops with it).
    detector: the run's; None: whichever the calibration holds (of memoguard.score.STEP_DETECTORS where the score
    comes from a sampling run: `sampler_run`)."""
    how_to = f"run `memoguard calibrate --model ...` on it ({model.name})"
    if path is not None:
        path = Path(path)
        lookup = CalibrationLookup("file", path.name, [path.parent], how_to, detector, sampler_run)
    else:
        lookup = CalibrationLookup("auto", "", [default_store_folder()], how_to, detector, sampler_run)
    found = lookup.resolve(model.model_key)
    if found.calibration is None:
        if found.absent:
            return None, []
        raise CalibrationError(found.problem)
    level = model.noise_level(model.timesteps(steps)[0])
    calibration = found.calibration.at_noise_level(level)
    return calibration, calibration.check(model.parameterization, level, model.latent_shape(), window=1,
                                          embedded_guidance=model.embedded_guidance)

