"""Stand-in for modules/paths.py: where the WebUI keeps its models (tests point it at a temporary folder)."""
import tempfile
from pathlib import Path

models_path = str(Path(tempfile.gettempdir()) / "memoguard-standin-models")
