"""ComfyUI entry point of the MemoGuard node pack (V3 nodes; the math lives in the `memoguard` package).

Importing this is quick: torch, numpy and the pack's own modules only, no diffusers/transformers,
no network. `memoguard` is the copy shipped in this folder (memoguard/_bootstrap.py says why and how);
a different one imported earlier is kept and named in a warning.
"""
import importlib.util
import logging
import os

_CORE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memoguard")
if os.path.isfile(os.path.join(_CORE, "__init__.py")):
    _spec = importlib.util.spec_from_file_location("_memoguard_bootstrap", os.path.join(_CORE, "_bootstrap.py"))
    _bootstrap = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_bootstrap)
    _warning = _bootstrap.use_shipped(_CORE)
    if _warning:
        logging.getLogger("memoguard").warning(_warning)
else:
    import memoguard  # noqa: F401  (pip-installed)

WEB_DIRECTORY = "./js"

try:
    import comfy_api.latest  # noqa: F401
except ImportError:  # imported outside ComfyUI, e.g. pytest setting up this folder as a package
    pass
else:
    from .nodes.extension import comfy_entrypoint  # noqa: F401
