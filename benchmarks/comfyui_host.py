"""A real ComfyUI in this process, with the MemoGuard pack importable as `memoguard_pack`.

For scripts run with ComfyUI's Python and COMFYUI_DIR set (benchmarks/comfyui_*.py, the real-host
SDXL check in tests/comfyui).
"""
import importlib.util
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_comfy():
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        sys.exit("set COMFYUI_DIR to a ComfyUI checkout and run with its Python")
    sys.path.insert(0, comfy_dir)
    import utils.extra_config  # noqa: F401  (ComfyUI's own import order)
    import comfy.cli_args
    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    spec = importlib.util.spec_from_file_location("memoguard_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["memoguard_pack"] = pack
    spec.loader.exec_module(pack)
