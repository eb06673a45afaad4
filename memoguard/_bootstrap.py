"""Make `import memoguard` give the copy shipped with a host entry, before anything else imports it.

The ComfyUI pack (the repository's __init__.py) and the WebUI extension (a1111_extension/memoguard_a1111)
load this file by its path and call use_shipped() with their `memoguard/` folder: an older memoguard
pip-installed into the host's environment would otherwise win the import. Putting the pack's folder first
on sys.path is no answer, as its top-level folders (nodes/, scripts/) would shadow the host's own modules.
Standard library only: nothing of memoguard may run before the right copy is chosen.
"""
import importlib.util
import runpy
import sys
from pathlib import Path
from typing import Optional


def _location(module) -> str:
    file = getattr(module, "__file__", None)
    return str(Path(file).resolve()) if file else "an unknown location"


def use_shipped(core) -> Optional[str]:
    """Import memoguard from the folder `core` unless a memoguard is imported already. Returns None when the
    memoguard in use is that copy, else a warning naming both versions and paths (never raises for that)."""
    core = Path(core).resolve()
    init = core / "__init__.py"
    if "memoguard" not in sys.modules:
        spec = importlib.util.spec_from_file_location("memoguard", init, submodule_search_locations=[str(core)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["memoguard"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop("memoguard", None)  # as a failed import leaves it
            raise
    in_use = sys.modules["memoguard"]
    if _location(in_use) == str(init):
        return None
    shipped = runpy.run_path(str(core / "_version.py")).get("__version__", "?")
    return (f"memoguard {getattr(in_use, '__version__', '(no version)')} from {_location(in_use)} was imported "
            f"before this extension's own memoguard {shipped} ({init}) and is the one in use; remove or update "
            "the other copy (e.g. pip uninstall memoguard in this environment) and restart")
