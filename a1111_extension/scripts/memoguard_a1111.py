"""WebUI entry when this folder itself is the extension (linked or copied into extensions/)."""
import sys
from pathlib import Path

# First, so this extension's package is the one imported; it then loads the memoguard core shipped above it.
_EXTENSION = str(Path(__file__).resolve().parents[1])
if _EXTENSION not in sys.path:
    sys.path.insert(0, _EXTENSION)
from memoguard_a1111.script import MemoGuardAccordion, MemoGuardScript  # noqa: E402,F401  the WebUI collects Script subclasses
