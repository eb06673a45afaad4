"""Which calibration a run uses: one lookup for ComfyUI, the WebUIs and the command line.

A calibration is only true for the weights it was measured on, so it is always looked up by the run's
model key (memoguard.identity). Choices:
- "auto": the key's file in the host's calibration folders (first = where calibrations are saved), then
  the preset shipped for MemoGuard's tiny model;
- "file": a file the user picked by NAME from those folders (`file_choices`); only its entry for this key
  is used. A path, or a name that is not in the folders, is refused without saying whether such a file
  exists anywhere: hosts never read a file outside their model folders;
- "none": raw scores, no verdict.

`resolve` never raises: what went wrong is a message for the user (`Resolution.problem`), with what to do
(`how_to`, worded for the host). How a run differs from the calibration it got is `Calibration.check`.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from .calibration import Calibration, CalibrationError, CalibrationStore, keys_in
from .score import DEFAULT_DETECTOR, STEP_DETECTORS

CHOICES = ("auto", "file", "none")
NO_FILE = "(none)"   # the file list's first entry: no file picked
SUFFIX = ".json"


def file_choices(folders: Sequence) -> List[str]:
    """The calibration files a user may pick: names of the .json files in `folders`, first folder first."""
    names = []
    for folder in folders:
        try:
            found = sorted(p.name for p in Path(folder).iterdir() if p.suffix == SUFFIX and p.is_file())
        except OSError:
            continue
        names += [n for n in found if n not in names]
    return names


def _picked(name: str, folders: Sequence) -> Optional[Path]:
    """The file `name` stands for in `folders`, or None when it is not one of `file_choices`."""
    if not name or Path(name).name != name or name in (".", ".."):
        return None
    for folder in folders:
        path = Path(folder) / name
        if path.suffix == SUFFIX and path.is_file():
            return path
    return None


@dataclass
class Resolution:
    calibration: Optional[Calibration]
    source: str = ""         # where it came from (a path, or the bundled preset)
    problem: str = ""        # why there is none, and what to do
    absent: bool = False     # none because none was made for this model (not a refused or broken file)

    @property
    def message(self) -> str:
        return self.problem or (f"calibration from {self.source}" if self.calibration is not None else "")


def run_detector(calibration: Optional[Calibration]) -> str:
    """How a sampler's run is scored: as its calibration's scores are, else by the default detector."""
    return calibration.detector if calibration is not None else DEFAULT_DETECTOR


@dataclass
class CalibrationLookup:
    choice: str = "auto"
    file: str = ""                                   # a name from file_choices(folders), for "file"
    folders: Sequence = field(default_factory=list)  # the host's calibration folders
    how_to: str = "calibrate this model once"        # what the user does to get a calibration, in host words
    detector: Optional[str] = None                   # how the run scores (memoguard.score.DETECTORS); None: the
                                                     # run scores as the calibration found does
    sampler_run: bool = True                         # the run's score comes from its sampler's steps (hosts), so
                                                     # only memoguard.score.STEP_DETECTORS serve it

    def __post_init__(self):
        if self.choice not in CHOICES:
            raise CalibrationError(f"calibration must be one of {', '.join(CHOICES)}, got {self.choice!r}")
        self.file = "" if self.file in (None, NO_FILE) else str(self.file).strip()

    def describe(self) -> str:
        if self.choice == "none":
            return "calibration 'none': raw scores, no verdict"
        if self.choice == "file":
            return f"calibration file {self.file or '(none picked)'}, if it was made for the loaded weights"
        return "calibration 'auto': the one made for the loaded weights"

    def resolve(self, key: Optional[str]) -> Resolution:
        """The calibration of exactly this model key, or why there is none. Never raises."""
        if self.choice == "none":
            return Resolution(None, problem="calibration 'none' chosen: raw score only")
        if not key:
            return Resolution(None, problem="the model's weights could not be identified: no calibration applies")
        try:
            found = self._from_file(key) if self.choice == "file" else self._auto(key)
        except CalibrationError as e:  # a broken file is said, never skipped for another one
            return Resolution(None, problem=f"calibration unusable ({e}); delete the file or calibrate again")
        measured = found.calibration.detector if found.calibration else None
        if measured is None:
            return found
        if self.detector is not None and measured != self.detector:  # scores of another kind: no verdict from them
            return Resolution(None, problem=f"the calibration from {found.source} holds {measured} scores; this run "
                                            f"scores with the {self.detector} detector: calibrate with that detector")
        if self.sampler_run and measured not in STEP_DETECTORS:
            return Resolution(None, problem=f"the calibration from {found.source} holds {measured} scores, which "
                                            f"only a first-step scan gives (memoguard scan --detector {measured})")
        return found

    def _from_file(self, key: str) -> Resolution:
        if not self.file:
            return Resolution(None, problem="calibration 'file' chosen but no file picked")
        path = _picked(self.file, self.folders)
        if path is None:
            where = str(Path(self.folders[0])) if self.folders else "the calibration folder"
            return Resolution(None, problem=f"calibration file {self.file!r} is not one of the calibrations in "
                                            f"{where}: calibrations are read only from there; copy the file into "
                                            f"that folder and pick it by name")
        found = Calibration.find(path, key)
        if found is None:
            return Resolution(None, problem=f"calibration file {self.file} was made for another model "
                                            f"({', '.join(keys_in(path)) or 'none'}), not this one ({key}): a "
                                            f"calibration of one model is never applied to another; {self.how_to}")
        return Resolution(found, str(path))

    def _auto(self, key: str) -> Resolution:
        found, source = CalibrationStore(*self.folders).locate(key) if self.folders else (None, "")
        if found is None:
            return Resolution(None, problem=f"no calibration for this model ({key}): {self.how_to}", absent=True)
        return Resolution(found, source)
