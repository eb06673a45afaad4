"""Which calibration a run uses: the one made for the weights the sampler is running, found by their key.

A calibration is only true for the weights it was measured on. The key is memoguard.identity's
weights fingerprint of the denoiser (`diffusion_model`), the same in ComfyUI, the WebUI and the CLI.
It is taken once per sampling run, at the first step, from the model the sampler calls, so LoRA
patches that ComfyUI has baked into the weights count. Repeated runs of the same weights (same
ComfyUI patch set) reuse the key without hashing again.

Choices: "auto" looks the key up in ComfyUI's models/memoguard folder(s) (a MemoGuard Calibrate
node saves there), then in the preset bundled for MemoGuard's tiny model; "file" reads a given
file but also only uses it when it holds this key; "none" gives raw scores only. Nothing here
raises: a missing calibration or a broken file becomes a message and an "uncalibrated" verdict.
"""
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

from memoguard import Calibration, CalibrationError
from memoguard.calibration import CalibrationStore, default_store_folder
from memoguard.identity import cached_fingerprint
from memoguard.hosts import noise_level_flow, prediction_name

log = logging.getLogger("memoguard")

FOLDER_NAME = "memoguard"   # folder_paths name: ComfyUI/models/memoguard, or an extra_model_paths entry
CHOICES = ("auto", "file", "none")
TOOLTIP = ("Benign-prompt scores that turn the score into a verdict. 'auto': the calibration made for the "
           "loaded weights (MemoGuard Calibrate node, saved in models/memoguard; MemoGuard's tiny model has "
           "one built in). 'file': a calibration JSON, used only if it was made for these weights. "
           "'none': raw scores, no verdict.")
HOW_TO = ("add a MemoGuard Calibrate node with this MODEL and CLIP and run it once; it saves to "
          "models/memoguard and 'auto' finds it")


def calibration_folders() -> list:
    """The folders 'auto' searches, first = where the Calibrate node saves. Empty outside ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        return []
    default = os.path.join(folder_paths.models_dir, FOLDER_NAME)
    folder_paths.add_model_folder_path(FOLDER_NAME, default)  # after any extra_model_paths entry
    return folder_paths.get_folder_paths(FOLDER_NAME)


# -- what the sampler is running -----------------------------------------------------------------
def model_key(base_model) -> str:
    """Weights fingerprint of a ComfyUI BaseModel's diffusion_model, cached per ComfyUI patch state."""
    state = (getattr(base_model, "current_weight_patches_uuid", None), getattr(base_model, "model_lowvram", None),
             getattr(base_model, "lowvram_patch_counter", None))
    return cached_fingerprint(base_model.diffusion_model, state)


def prediction_of(base_model) -> Optional[str]:
    """eps / v / flow (as memoguard.calibration records it) from ComfyUI's model_type; None if unknown."""
    kind = getattr(getattr(base_model, "model_type", None), "name", None)
    if kind is None:
        return "flow" if is_flow(base_model) else None
    return prediction_name(kind)


def is_flow(base_model) -> bool:
    sampling = getattr(base_model, "model_sampling", None)
    return any(c.__name__ == "CONST" for c in type(sampling).__mro__)


def noise_level(base_model, sigma: float) -> float:
    """memoguard's noise level (sigma / alpha) of ComfyUI's sigma: sigma itself, sigma/(1-sigma) for flow."""
    return noise_level_flow(sigma) if is_flow(base_model) else sigma


# -- finding the calibration -------------------------------------------------------------------------
@dataclass
class CalibrationSource:
    """Where a node takes its calibration from; resolve() is called once per run with the run's key."""
    choice: str = "auto"
    path: str = ""
    folders: Optional[Sequence] = None   # None: ComfyUI's models/memoguard folders

    def __post_init__(self):
        if self.choice not in CHOICES:
            raise ValueError(f"calibration must be one of {', '.join(CHOICES)}, got {self.choice!r}")

    def describe(self) -> str:
        if self.choice == "none":
            return "calibration 'none': raw scores, no verdict"
        if self.choice == "file":
            return f"calibration file {self.path.strip() or '(no path given)'}, if it was made for the loaded weights"
        return "calibration 'auto': the one made for the loaded weights"

    def resolve(self, key: str) -> Tuple[Optional[Calibration], str]:
        """(calibration of exactly this model key or None, what the user is told). Never raises."""
        if self.choice == "none":
            return None, "calibration 'none' chosen: raw score only"
        if self.choice == "file":
            return self._from_file(key)
        return self._auto(key)

    def _from_file(self, key: str):
        path = str(self.path).strip()
        if not path:
            return None, "calibration 'file' chosen but no calibration_file given"
        try:
            return Calibration.load(Path(path).expanduser(), key), f"calibration {key} from {path}"
        except CalibrationError as e:
            if "has no calibration for model" in str(e):
                return None, (f"calibration file not used: it was made for another model ({e}); a calibration "
                              f"of one model is never applied to another; {HOW_TO}")
            return None, f"calibration file not used: {e}"

    def _auto(self, key: str):
        folders = calibration_folders() if self.folders is None else list(self.folders)
        if not folders:
            folders = [default_store_folder()]  # outside ComfyUI (tests, scripts): the CLI's folder
        try:
            found, source = CalibrationStore(*folders).locate(key)
        except CalibrationError as e:  # never fall back silently past a broken file
            return None, f"calibration for this model is unusable ({e}); delete the file or calibrate again"
        if found is None:
            return None, f"no calibration for this model ({key}): {HOW_TO}"
        return found, f"calibration {key} ({source})"


