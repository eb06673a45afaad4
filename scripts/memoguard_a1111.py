"""WebUI entry when the whole repository is the extension ("Install from URL"); see a1111_extension/."""
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1] / "a1111_extension"))
from memoguard_a1111.script import MemoGuardScript  # noqa: E402,F401  the WebUI collects Script subclasses
