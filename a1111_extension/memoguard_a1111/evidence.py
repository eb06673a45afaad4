"""Copy evidence in the WebUI: each image of a run beside its nearest training image (memoguard.evidence).

Training folders are picked by name from <models_path>/memoguard_training (each subfolder a dataset: images with
kohya-style .txt captions), never a typed path; indexes are cached in models/memoguard/indexes. The verdict uses the
copy threshold stored for the loaded weights' key (set by `memoguard index --calibrate` or ComfyUI's Copy Evidence
node; the keys are the same). Each image is judged in the accordion's postprocess_image, before its infotext is
written; a failure is a message in the panel and infotext, never a lost image."""
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from memoguard.evidence import Match, TrainingIndex, card_base64, dataset_folders

from .calibrate import store_folder

SUBFOLDER = "memoguard_training"
NO_FOLDER = "(none)"


def roots() -> list:
    from modules import paths
    return [Path(paths.models_path) / SUBFOLDER]


def folder_options() -> list:
    return [NO_FOLDER, *dataset_folders(roots())]


class RunEvidence:
    """One generation's copy evidence: the index opened once, each image judged as the WebUI hands it over."""

    def __init__(self, name: str, key_of, progress_text=None):
        """key_of(): the loaded weights' key (known once sampling started); progress_text(text): the WebUI's."""
        self.name, self.key_of, self.progress_text = name, key_of, progress_text
        self.index: Optional[TrainingIndex] = None
        self.matches: Dict[Tuple[int, int], Tuple[Match, str]] = {}  # (iteration, position) -> (match, card PNG)
        self.seen: Dict[int, int] = {}  # images judged per iteration: the next one's position
        self.error: Optional[str] = None

    def _open(self) -> TrainingIndex:
        if self.index is None:
            folder = dataset_folders(roots()).get(self.name)
            if folder is None:
                raise ValueError(f"training folder {self.name!r} is not in models/{SUBFOLDER} (folders are picked by "
                                 f"name from there; put the dataset there and reload the UI)")
            say = self.progress_text or (lambda text: None)
            self.index = TrainingIndex.open(folder, store_folder() / "indexes",
                                            progress=lambda done, total: say(f"MemoGuard: indexing {folder.name}: "
                                                                             f"{done}/{total} images"))
        return self.index

    def judge(self, image, iteration: int) -> None:
        """Judge the next image of `iteration` (a PIL image): its match and card are kept for the infotext and the
        panel. A failure is kept as the run's error (said once), and the image is left as it is."""
        position = self.seen.get(iteration, 0)
        self.seen[iteration] = position + 1
        if self.error is not None:
            return
        try:
            index = self._open()
            pixels = np.asarray(image.convert("RGB"))[None]
            match = index.nearest(pixels, self.key_of())[0]
            self.matches[(iteration, position)] = (match, card_base64(index, pixels[0], match))
        except (OSError, ValueError, InterruptedError) as e:  # IndexError_ is a ValueError
            self.error = f"copy evidence: {e}"

    def infotext(self, iteration: int, position: int) -> Optional[str]:
        found = self.matches.get((iteration, position))
        if found is None:
            return self.error
        m = found[0]
        return f"{self.name}/{m.file}, similarity {m.similarity:.3f}, {m.verdict}"

    def card(self, iteration: int, position: int) -> Optional[str]:
        found = self.matches.get((iteration, position))
        return None if found is None else found[1]
