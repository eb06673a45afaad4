"""WebUI entry when the whole repository is the extension ("Install from URL"); see a1111_extension/."""
import sys
from pathlib import Path

# First, so this repository's extension package is the one imported; it then loads the memoguard core
# shipped next to it (the repository root itself never goes on sys.path: its folders would shadow the WebUI's).
_EXTENSION = str(Path(__file__).resolve().parents[1] / "a1111_extension")
if _EXTENSION not in sys.path:
    sys.path.insert(0, _EXTENSION)
from memoguard_a1111.script import MemoGuardAccordion, MemoGuardScript  # noqa: E402,F401  the WebUI collects Script subclasses
