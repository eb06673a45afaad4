"""MemoGuard for the Automatic1111 WebUI: host glue only; the math lives in the `memoguard` core.

The core is the copy shipped in the repository folder that holds this extension, loaded first (see
memoguard/_bootstrap.py); with no such folder (only this extension copied), the one on sys.path
(pip-installed into the WebUI's environment). A different memoguard imported earlier is kept and
named on stderr.
"""
import importlib.util
import sys
from pathlib import Path

_CORE = Path(__file__).resolve().parents[2] / "memoguard"
if (_CORE / "__init__.py").is_file():
    _spec = importlib.util.spec_from_file_location("_memoguard_bootstrap", _CORE / "_bootstrap.py")
    _bootstrap = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_bootstrap)
    _warning = _bootstrap.use_shipped(_CORE)
    if _warning:
        print(f"MemoGuard: {_warning}", file=sys.stderr)
