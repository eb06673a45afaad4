"""Which calibration a run uses in ComfyUI: the core's lookup (memoguard.calibration_lookup) over ComfyUI's
models/memoguard folder(s), by the key of the weights the sampler is running.

The key is memoguard.identity's weights fingerprint of the denoiser (`diffusion_model`), the same in
ComfyUI, the WebUI and the CLI. It is taken once per sampling run, at the first step, from the model the
sampler calls, so LoRA patches that ComfyUI has baked into the weights count. Repeated runs of the same
weights (same ComfyUI patch set) reuse the key without hashing again. A file is picked from the list of
calibrations in models/memoguard (folder_paths "memoguard", extra_model_paths entries included), never
by path.
"""
import logging
import os
from typing import Optional

import torch

from memoguard.calibration import default_store_folder
from memoguard.calibration_lookup import NO_FILE, CalibrationLookup, file_choices
from memoguard.identity import cached_fingerprint
from memoguard.hosts import prediction_name

log = logging.getLogger("memoguard")

FOLDER_NAME = "memoguard"   # folder_paths name: ComfyUI/models/memoguard, or an extra_model_paths entry
TOOLTIP = ("Benign-prompt scores that turn the score into a verdict. 'auto': the calibration made for the "
           "loaded weights (MemoGuard Calibrate node, saved in models/memoguard; MemoGuard's tiny model has "
           "one built in). 'file': the calibration picked in calibration_file, used only if it was made for "
           "these weights. 'none': raw scores, no verdict.")
FILE_TOOLTIP = ("A calibration JSON from models/memoguard (used when calibration is 'file'; only its entry for the "
                "loaded weights is used). Put a file there and refresh to see it.")
HOW_TO = ("add a MemoGuard Calibrate node with this MODEL and CLIP and run it once; it saves to "
          "models/memoguard and 'auto' finds it")


def calibration_folders() -> list:
    """The folders calibrations are read from, first = where the Calibrate node saves. Outside ComfyUI (tests,
    scripts): the CLI's folder."""
    try:
        import folder_paths
    except ImportError:
        return [default_store_folder()]
    default = os.path.join(folder_paths.models_dir, FOLDER_NAME)
    folder_paths.add_model_folder_path(FOLDER_NAME, default)  # after any extra_model_paths entry
    return folder_paths.get_folder_paths(FOLDER_NAME)


def file_options() -> list:
    """calibration_file's list: no file, then the calibrations in models/memoguard."""
    return [NO_FILE] + file_choices(calibration_folders())


def accept_saved_value(_value) -> bool:
    """validate_inputs of the nodes whose file input was free text before it became a list (calibration_file,
    the tiny loader's folder): a workflow saved with a path (or "") still queues, and the node then says what to
    do, instead of ComfyUI refusing the whole prompt with "Value not in list"."""
    return True


def lookup(choice: str = "auto", file: str = "", folders=None) -> CalibrationLookup:
    """The core's lookup with ComfyUI's folders and words (folders: for tests)."""
    return CalibrationLookup(choice, file, calibration_folders() if folders is None else list(folders), HOW_TO)


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


def embedded_guidance(conds) -> Optional[float]:
    """The guidance value a guidance-distilled model (Flux dev: FluxGuidance) gets from the first of the sampler's
    conditioning entries that carries one; None for models without it."""
    for entry in conds or []:
        value = entry.get("model_conds", {}).get("guidance")
        if value is not None and isinstance(value.cond, torch.Tensor) and value.cond.numel():
            return float(value.cond.reshape(-1)[0])
    return None
