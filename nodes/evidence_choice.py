"""Which training folder the Copy Evidence node reads, and what it shows: ComfyUI glue around memoguard.evidence.

Training folders are picked by name from models/memoguard_training (folder_paths "memoguard_training", extra_model_paths
entries included): each subfolder is a dataset (images with kohya-style .txt captions, in subfolders too), never a
free path. Indexes are cached in models/memoguard/indexes."""
import os
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from memoguard.evidence import Match, TrainingIndex, dataset_folders, evidence_card

from .calibration_choice import calibration_folders

FOLDER_NAME = "memoguard_training"
NO_FOLDER = "(none: put a dataset folder in models/memoguard_training)"


def training_roots() -> List[str]:
    """The folders whose subfolders are training sets. Outside ComfyUI (tests): $MEMOGUARD_TRAINING if set."""
    try:
        import folder_paths
    except ImportError:
        return [os.environ["MEMOGUARD_TRAINING"]] if os.environ.get("MEMOGUARD_TRAINING") else []
    folder_paths.add_model_folder_path(FOLDER_NAME, os.path.join(folder_paths.models_dir, FOLDER_NAME))
    return folder_paths.get_folder_paths(FOLDER_NAME)


def training_folders() -> Dict[str, Path]:
    return dataset_folders(training_roots())


def folder_options() -> List[str]:
    return list(training_folders()) or [NO_FOLDER]


def chosen_folder(name: str) -> Path:
    """The picked training folder; ValueError with what to do for anything that is not one of them."""
    folder = training_folders().get(name)
    if folder is None:
        raise ValueError(f"{name!r} is not a training folder in models/memoguard_training: put the dataset folder "
                         f"(images and their .txt captions) there, refresh, and pick it by name (the tiny model's own: "
                         f"python -m memoguard index models/memoguard_training/tiny-shapes --write-evaluation-set "
                         f"shapes)")
    return folder


def index_cache() -> Path:
    return Path(calibration_folders()[0]) / "indexes"


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """A ComfyUI IMAGE (B, H, W, C) in [0, 1] as (B, H, W, 3) uint8."""
    arr = images[..., :3].detach().float().cpu().clamp(0, 1).numpy()
    return (arr * 255).round().astype(np.uint8)


def cards(index: TrainingIndex, images: np.ndarray, matches: List[Match]) -> torch.Tensor:
    """One card per image (memoguard.evidence.evidence_card) as a ComfyUI IMAGE batch, padded white to the tallest."""
    drawn = [evidence_card(index, image, match) for image, match in zip(images, matches)]
    height, width = max(c.height for c in drawn), max(c.width for c in drawn)
    batch = np.full((len(drawn), height, width, 3), 255, np.uint8)
    for k, card in enumerate(drawn):
        batch[k, :card.height, :card.width] = np.asarray(card)
    return torch.from_numpy(batch.astype(np.float32) / 255)
