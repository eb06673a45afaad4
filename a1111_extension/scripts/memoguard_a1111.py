"""WebUI entry when this folder itself is the extension (linked or copied into extensions/)."""
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))
from memoguard_a1111.script import MemoGuardScript  # noqa: E402,F401  the WebUI collects Script subclasses
