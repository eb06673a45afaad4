"""MemoGuard for the Automatic1111 WebUI: host glue only; the math lives in the `memoguard` core.

The core is found on sys.path (pip-installed into the WebUI's environment) or, as shipped, in
the repository folder that holds this extension.
"""
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("memoguard") is None:
    sys.path.append(str(Path(__file__).resolve().parents[2]))
