"""ComfyUI entry point of the MemoGuard node pack (V3 nodes; the math lives in the `memoguard` package).

Importing this is quick: torch, numpy and the pack's own modules only, no diffusers/transformers,
no network.
"""
import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
try:
    import memoguard  # noqa: F401  (pip-installed)
except ImportError:
    sys.path.append(_ROOT)  # appended, so ComfyUI's own top-level modules keep precedence

WEB_DIRECTORY = "./js"

try:
    import comfy_api.latest  # noqa: F401
except ImportError:  # imported outside ComfyUI, e.g. pytest setting up this folder as a package
    pass
else:
    from .nodes.extension import comfy_entrypoint  # noqa: F401
