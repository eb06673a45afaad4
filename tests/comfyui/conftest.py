import sys
from pathlib import Path

# The node pack's `nodes` package lives at the repository root, next to `memoguard`.
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

# The tiny models here are faster on one thread than on cores shared with other jobs.
torch.set_num_threads(1)


def _model_management_stand_in():
    """comfy.model_management's interrupt flag (what the queue's Cancel sets) and comfy.samplers.calc_cond_batch,
    where ComfyUI is not installed."""
    import importlib.util
    import types
    if importlib.util.find_spec("comfy") is not None:
        return
    comfy = types.ModuleType("comfy")
    management = types.ModuleType("comfy.model_management")
    management.interrupt_processing = False
    management.processing_interrupted = lambda: management.interrupt_processing
    from . import harness
    samplers = types.ModuleType("comfy.samplers")
    samplers.calc_cond_batch = harness.calc_cond_batch
    comfy.model_management, comfy.samplers = management, samplers
    sys.modules.update({"comfy": comfy, "comfy.model_management": management, "comfy.samplers": samplers})


_model_management_stand_in()
