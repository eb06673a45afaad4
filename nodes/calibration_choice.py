"""Which calibration a node uses: the bundled model's preset, a user's file, or none."""
from pathlib import Path
from typing import Optional, Tuple

from memoguard import Calibration, CalibrationError

BUNDLED_FILE = Path(__file__).resolve().parents[1] / "memoguard" / "assets" / "calibration.json"
BUNDLED_KEY = "memoguard-tiny-sd"
CHOICES = ("bundled tiny model", "file", "none")
TOOLTIP = ("Benign-prompt scores that turn a score into a percentile and a threshold. 'bundled tiny model' "
           "fits only MemoGuard's tiny model; for your own checkpoint make one with "
           "`python -m memoguard calibrate` and pick 'file'.")


def load_calibration(choice: str, path: str = "", model_key: str = "") -> Tuple[Optional[Calibration], str]:
    """(calibration or None, a note for the user). Never raises: a bad file means no calibration, said clearly."""
    if choice == "none":
        return None, "no calibration: scores shown without percentile"
    if choice == "bundled tiny model":
        path, model_key = BUNDLED_FILE, BUNDLED_KEY
    elif choice != "file":
        return None, f"unknown calibration choice {choice!r}; expected one of {', '.join(CHOICES)}"
    if not str(path).strip():
        return None, "calibration 'file' chosen but no path given: scores shown without percentile"
    try:
        calibration = Calibration.load(Path(str(path).strip()).expanduser(), model_key.strip() or None)
    except CalibrationError as e:
        return None, f"calibration not used: {e}"
    return calibration, f"calibration {calibration.model_key} ({len(calibration.scores)} benign prompts)"
