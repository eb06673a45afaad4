"""Copy evidence: which training image a generation reproduces, from an index of the training folder.

A fine-tuner has the images a LoRA or fine-tune learned from: a folder of images, with kohya-style captions beside
them (`name.txt`, or `name.caption`). `TrainingIndex` describes each image twice, with no weights and nothing
downloaded:
  - a thumbnail: the image area-averaged to THUMBNAIL x THUMBNAIL RGB, centred and scaled to unit length. The cosine
    similarity of two thumbnails survives what separates a regenerated copy from its source (small shifts, colour
    drift, noise, another resolution); the nearest training image is the one of highest similarity;
  - a perceptual hash (imagehash's pHash, 64 bits), the near-duplicate test of image deduplication tools: the bits
    in which two hashes differ are shown beside the similarity.
The copy verdict is Carlini et al.'s extraction test on thumbnails (2023: a generation copies when it is far closer
to one training image than to the others): the `ratio` of its distance to the nearest training image's thumbnail
over its mean distance to the next NEIGHBOURS - 1 (thumbnails as unit vectors), 0 for an exact copy, about 1 for a
picture no closer to one image than to its neighbours. A generation close to a whole family of similar training
images (a common subject, a plain style) is not a copy; one that sits on a single image is. The threshold is
calibrated on ordinary generations of the model (prompts that are not the dataset's captions): the ratio only `fpr`
of them reach, as the memorization verdict's threshold is set on benign prompts.

The index is cached in a folder of the user's choosing (never beside the images, never sent anywhere), keyed to the
folder's contents: each image by its path, size and modification time, so a changed, added or removed image is
indexed again or dropped, never silently reused. Building is resumable: an interrupted build keeps what it saved
(every SAVE_EVERY images) and the next one goes on from there. Copy thresholds are stored with the index, per model
key and per contents: a changed folder needs a new one.
"""
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .calibration import threshold_at_fpr
from .errors import MemoGuardError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIXES = (".txt", ".caption")
THUMBNAIL = 16
NEIGHBOURS = 50  # the nearest image and the 49 after it, as in Carlini et al.'s test
HASH_BITS = 64
BATCH = 64  # images decoded and described together
SAVE_EVERY = 512  # a multiple of BATCH
FORMAT = 1
MAX_CAPTION = 4096  # characters of a caption kept (a caption file is text, not a payload)
Progress = Callable[[int, int], None]  # (images described, images to describe)


class IndexError_(MemoGuardError, ValueError):
    """A folder that cannot be indexed, or an index file that is not one."""


@dataclass
class Match:
    """A generation's nearest training image."""
    file: str                 # path inside the indexed folder
    caption: str
    similarity: float         # thumbnail cosine similarity, 1 = the same picture
    ratio: float              # distance to it / mean distance to the next nearest (0: a copy of it alone)
    hash_distance: int        # pHash bits that differ (0 to 64)
    threshold: Optional[float] = None  # the copy threshold on the ratio (None: not calibrated for this model)

    @property
    def copy(self) -> Optional[bool]:
        return None if self.threshold is None else self.ratio <= self.threshold

    @property
    def verdict(self) -> str:
        """The copy verdict in words, the same wherever it is shown."""
        if self.threshold is None:
            return "no copy threshold for these weights and this folder"
        return f"{'COPY' if self.copy else 'no copy'} (ratio {self.ratio:.3f}, threshold {self.threshold:.3f})"

    def summary(self) -> str:
        caption = f' "{self.caption[:60]}"' if self.caption else ""
        return (f"nearest training image {self.file}{caption}: similarity {self.similarity:.3f}, "
                f"pHash distance {self.hash_distance}; {self.verdict}")

    def lines(self) -> List[str]:
        """What a card under the two pictures says: the file, its caption, the measures, the verdict (last)."""
        return [self.file, f'caption: "{self.caption}"' if self.caption else "no caption",
                f"similarity {self.similarity:.3f}, ratio {self.ratio:.3f}, pHash distance {self.hash_distance}",
                self.verdict]

    def to_dict(self) -> dict:
        return {"file": self.file, "caption": self.caption, "similarity": self.similarity, "ratio": self.ratio,
                "hash_distance": self.hash_distance, "threshold": self.threshold, "copy": self.copy}


def _pictures(images) -> list:
    """PIL images from images (N, H, W, 3) in [0, 1] or uint8 (numpy or torch), or a list of PIL images as it is."""
    from PIL import Image
    if isinstance(images, np.ndarray) or hasattr(images, "numpy"):
        arr = images.numpy() if hasattr(images, "numpy") else images
        arr = arr if arr.dtype == np.uint8 else (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        return [Image.fromarray(a) for a in arr]
    return list(images)


def thumbnail_vectors(images) -> np.ndarray:
    """(N, 3 * THUMBNAIL^2) unit-length, centred thumbnails of the images (see _pictures)."""
    from PIL import Image
    out = np.stack([np.asarray(_small(im).resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX), np.float32).reshape(-1)
                    for im in _pictures(images)])
    out -= out.mean(1, keepdims=True)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norm > 0, norm, 1)


def perceptual_hashes(images) -> np.ndarray:
    """(N, 8) uint8: each image's 64-bit pHash, packed (images: see _pictures)."""
    try:
        import imagehash
    except ImportError:
        raise IndexError_("copy evidence needs the imagehash package: pip install imagehash") from None
    return np.stack([np.packbits(imagehash.phash(_small(im)).hash.reshape(-1)) for im in _pictures(images)])


def _small(image):
    """RGB, at most about 512 px a side (a thumbnail and a pHash need no more; a JPEG is decoded at a reduced size)."""
    if image.format == "JPEG":
        image.draft("RGB", (256, 256))
    image = image.convert("RGB")
    if max(image.size) > 512:
        image = image.reduce(max(1, max(image.size) // 256))
    return image


def _describe(batch, unreadable: list) -> dict:
    """{file: (stamp, caption, thumbnail, hash)} of a batch of (file, path, stamp); a file that cannot be decoded is
    named in `unreadable`, not fatal."""
    from PIL import Image
    opened, kept = [], []
    for name, path, stamp in batch:
        try:
            with Image.open(path) as im:
                opened.append(_small(im))
            kept.append((name, path, stamp))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            unreadable.append(f"{name}: {type(e).__name__}: {e}")
    if not opened:
        return {}
    thumbs, hashes = thumbnail_vectors(opened), perceptual_hashes(opened)
    return {name: (stamp, _caption(path), thumbs[k], hashes[k]) for k, (name, path, stamp) in enumerate(kept)}


def hash_distances(hashes: np.ndarray, query: np.ndarray) -> np.ndarray:
    """(Q, N) bits in which each query hash differs from each indexed one."""
    return np.unpackbits(query[:, None, :] ^ hashes[None, :, :], axis=-1).sum(-1)


def _stamp(path: Path) -> List[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _caption(image: Path) -> str:
    for suffix in CAPTION_SUFFIXES:
        text_file = image.with_suffix(suffix)
        if text_file.is_file():
            return text_file.read_text(encoding="utf-8", errors="replace")[:MAX_CAPTION].strip()
    return ""


def image_files(folder: Path) -> List[Path]:
    """The folder's images, in subfolders too (kohya's `10_name` repeat folders), sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def contents_key(files: Sequence[str], stamps: Sequence[Sequence[int]]) -> str:
    """A digest of the indexed images' paths, sizes and modification times."""
    digest = hashlib.sha256(json.dumps([[f, *s] for f, s in zip(files, stamps)]).encode())
    return digest.hexdigest()[:16]


@dataclass
class TrainingIndex:
    folder: Path
    files: List[str] = field(default_factory=list)
    stamps: List[List[int]] = field(default_factory=list)
    captions: List[str] = field(default_factory=list)
    thumbnails: np.ndarray = field(default_factory=lambda: np.zeros((0, 3 * THUMBNAIL ** 2), np.float32))
    hashes: np.ndarray = field(default_factory=lambda: np.zeros((0, HASH_BITS // 8), np.uint8))
    copy_thresholds: Dict[str, dict] = field(default_factory=dict)  # model key -> {threshold, fpr, contents, ...}
    unreadable: List[str] = field(default_factory=list)  # images that could not be decoded (skipped, named)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def contents(self) -> str:
        return contents_key(self.files, self.stamps)

    # -- building -------------------------------------------------------------------------
    @classmethod
    def open(cls, folder, cache_dir, progress: Optional[Progress] = None,
             should_stop: Optional[Callable[[], bool]] = None) -> "TrainingIndex":
        """The index of `folder`, brought up to date with its contents: the cached one in `cache_dir` where its
        entries still match their files, the rest described now (and saved every SAVE_EVERY images)."""
        folder = Path(folder).resolve()
        if not folder.is_dir():
            raise IndexError_(f"{folder} is not a folder of training images")
        cache = cache_file(folder, cache_dir)
        old = cls.load(cache) if cache.is_file() else None
        if old is not None and old.folder != folder:
            old = None  # a digest collision or a moved cache: never another folder's descriptors
        paths = image_files(folder)
        if not paths:
            raise IndexError_(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        known = {} if old is None else {f: i for i, f in enumerate(old.files)}
        rows, todo = {}, []  # file -> (stamp, caption, thumbnail, hash)
        for path in paths:
            name, stamp = path.relative_to(folder).as_posix(), _stamp(path)
            i = known.get(name)
            if i is not None and old.stamps[i] == stamp:
                rows[name] = (stamp, old.captions[i], old.thumbnails[i], old.hashes[i])
            else:
                todo.append((name, path, stamp))
        thresholds = dict(old.copy_thresholds) if old else {}
        unreadable = []
        for start in range(0, len(todo), BATCH):
            if should_stop is not None and should_stop():
                cls._from_rows(folder, rows, thresholds, unreadable).save(cache)
                raise InterruptedError(f"indexing stopped after {len(rows)} of {len(paths)} images (saved; the next "
                                       "run goes on from there)")
            rows.update(_describe(todo[start:start + BATCH], unreadable))
            done = min(len(todo), start + BATCH)
            if progress is not None:
                progress(done, len(todo))
            if done % SAVE_EVERY == 0:
                cls._from_rows(folder, rows, thresholds, unreadable).save(cache)
        index = cls._from_rows(folder, rows, thresholds, unreadable)
        index.save(cache)
        return index

    @classmethod
    def _from_rows(cls, folder, rows: dict, thresholds: dict, unreadable: list) -> "TrainingIndex":
        names = sorted(rows)
        if not names:
            return cls(folder, copy_thresholds=thresholds, unreadable=list(unreadable))
        return cls(folder, names, [list(rows[n][0]) for n in names], [rows[n][1] for n in names],
                   np.stack([rows[n][2] for n in names]).astype(np.float32),
                   np.stack([rows[n][3] for n in names]).astype(np.uint8), thresholds, list(unreadable))

    # -- querying -------------------------------------------------------------------------
    def nearest(self, images, model_key: Optional[str] = None) -> List[Match]:
        """Each image's nearest training image (images (N, H, W, 3) in [0, 1] or uint8), judged by the copy threshold
        calibrated for `model_key` on these contents (none: no verdict)."""
        best, sims, ratios = self.neighbours(images)
        dist = np.unpackbits(perceptual_hashes(images) ^ self.hashes[best], axis=1).sum(1)
        threshold = self.copy_threshold(model_key)
        return [Match(self.files[j], self.captions[j], float(sims[i]), float(ratios[i]), int(dist[i]), threshold)
                for i, j in enumerate(best)]

    def neighbours(self, images):
        """(nearest index (N,), its similarity (N,), the copy ratio (N,)) of each image."""
        if len(self) < 2:
            raise IndexError_(f"the index of {self.folder} holds {len(self)} image(s); a copy test needs at least 2")
        sims = thumbnail_vectors(images) @ self.thumbnails.T
        k = min(NEIGHBOURS, len(self))
        top = np.sort(np.partition(-sims, k - 1, axis=1)[:, :k], axis=1)  # the k highest, negated, best first
        distance = np.sqrt(np.maximum(2 + 2 * top, 0))  # between unit vectors: sqrt(2 - 2 similarity)
        ratios = distance[:, 0] / np.maximum(distance[:, 1:].mean(1), 1e-9)
        return sims.argmax(1), -top[:, 0], ratios

    def image(self, match: Match):
        """The training image of a match as a PIL image (None where it cannot be read now); only files inside the
        indexed folder are opened."""
        from PIL import Image
        path = (self.folder / match.file).resolve()
        if not path.is_relative_to(self.folder) or not path.is_file():
            return None
        try:
            with Image.open(path) as im:
                return _small(im)
        except (OSError, ValueError, Image.DecompressionBombError):
            return None

    def near_duplicates(self, min_similarity: float = 0.98, max_hash_distance: int = 4) -> List[tuple]:
        """Pairs of indexed images that are near-duplicates of each other (similarity at or over `min_similarity`,
        or pHash within `max_hash_distance` bits): (file a, file b, similarity, hash distance)."""
        out = []
        for start in range(0, len(self), 1024):
            sims = self.thumbnails[start:start + 1024] @ self.thumbnails.T
            dist = hash_distances(self.hashes, self.hashes[start:start + 1024])
            for i, j in zip(*np.nonzero((sims >= min_similarity) | (dist <= max_hash_distance))):
                if start + i < j:
                    out.append((self.files[start + i], self.files[j], float(sims[i, j]), int(dist[i, j])))
        return out

    # -- the copy verdict -----------------------------------------------------------------
    def calibrate_copies(self, model_key: str, ordinary_images, fpr: float = 0.01, note: str = "") -> float:
        """Set the copy threshold of `model_key` from ordinary generations (images of prompts that are not the
        dataset's captions): the ratio that at most `fpr` of them reach (a copy is at or under it)."""
        if not 0 < fpr < 1:
            raise IndexError_(f"fpr must be in (0, 1), got {fpr}")
        _, _, ratios = self.neighbours(ordinary_images)
        if len(ratios) < math.ceil(1 / fpr):
            raise IndexError_(f"a threshold at {fpr:g} false positives needs at least {math.ceil(1 / fpr)} ordinary "
                              f"generations, got {len(ratios)}")
        threshold = -threshold_at_fpr((-ratios).tolist(), fpr)
        self.copy_thresholds[model_key] = {"threshold": threshold, "fpr": fpr, "contents": self.contents,
                                           "generations": len(ratios), "median": float(np.median(ratios)),
                                           "note": note, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        return threshold

    def copy_threshold(self, model_key: Optional[str]) -> Optional[float]:
        """The copy threshold calibrated for `model_key` on these very contents (None: none, or the folder changed)."""
        entry = self.copy_thresholds.get(model_key) if model_key else None
        return entry["threshold"] if entry and entry.get("contents") == self.contents else None

    # -- storage --------------------------------------------------------------------------
    def save_to(self, cache_dir) -> None:
        """Save in the cache folder where open() finds it."""
        self.save(cache_file(self.folder, cache_dir))

    def save(self, path: Path) -> None:
        """An .npz of plain arrays (no pickles) and a JSON header, written whole then renamed (never half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"format": FORMAT, "folder": str(self.folder), "files": self.files, "stamps": self.stamps,
                  "captions": self.captions, "copy_thresholds": self.copy_thresholds, "thumbnail": THUMBNAIL}
        part = path.with_name(path.name + ".part")
        with open(part, "wb") as f:
            np.savez(f, header=np.frombuffer(json.dumps(header).encode(), np.uint8),
                     thumbnails=self.thumbnails.astype(np.float32), hashes=self.hashes.astype(np.uint8))
        part.replace(path)

    @classmethod
    def load(cls, path: Path) -> Optional["TrainingIndex"]:
        """An index file, validated (shapes, types, lengths); None where it is not a whole, current one (it is then
        built again, never trusted)."""
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(bytes(data["header"]).decode())
                thumbs, hashes = data["thumbnails"], data["hashes"]
            n = len(header["files"])
            ok = (header.get("format") == FORMAT and header.get("thumbnail") == THUMBNAIL
                  and thumbs.dtype == np.float32 and thumbs.shape == (n, 3 * THUMBNAIL ** 2)
                  and np.isfinite(thumbs).all()
                  and hashes.dtype == np.uint8 and hashes.shape == (n, HASH_BITS // 8)
                  and len(header["stamps"]) == n and len(header["captions"]) == n
                  and all(isinstance(f, str) and not Path(f).is_absolute() and ".." not in Path(f).parts
                          for f in header["files"])
                  and all(isinstance(c, str) for c in header["captions"])
                  and all(isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) for v in s)
                          for s in header["stamps"])
                  and isinstance(header["copy_thresholds"], dict)
                  and all(isinstance(v, dict) and isinstance(v.get("threshold"), float)
                          for v in header["copy_thresholds"].values()))
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None
        if not ok:
            return None
        return cls(Path(header["folder"]), header["files"], header["stamps"], header["captions"], thumbs, hashes,
                   header["copy_thresholds"])


def ordinary_prompts(prompts: Sequence[str], captions: Sequence[str]) -> List[str]:
    """The prompts that are none of the dataset's captions: ordinary generations for the copy threshold."""
    known = {c.strip().lower() for c in captions}
    return [p for p in prompts if p.strip().lower() not in known]


def dataset_folders(roots) -> Dict[str, Path]:
    """{name: folder} of the training sets in `roots` (each subfolder one; the first root that holds a name wins):
    what hosts offer in their list, never a typed path."""
    found = {}
    for root in roots:
        try:
            subs = sorted(Path(root).iterdir())
        except OSError:
            continue
        for sub in subs:
            if sub.is_dir() and not sub.name.startswith(".") and sub.name not in found:
                found[sub.name] = sub
    return found


def evidence_card(index: "TrainingIndex", image, match: Match):
    """A generation (H, W, 3 uint8) beside its nearest training image, with the match's lines under them (PIL)."""
    from PIL import Image

    from .report import copy_evidence_card
    return copy_evidence_card(Image.fromarray(image), index.image(match), match.lines(), match.copy)


def card_base64(index: "TrainingIndex", image, match: Match) -> str:
    """evidence_card as a base64 PNG, for HTML pages (the audit report, the WebUI panel)."""
    import base64

    from .report import to_png
    return base64.b64encode(to_png(evidence_card(index, image, match))).decode()


def default_index_folder() -> Path:
    """Where the CLI keeps indexes: $MEMOGUARD_INDEXES, else ~/.cache/memoguard/indexes."""
    return Path(os.environ.get("MEMOGUARD_INDEXES", Path.home() / ".cache" / "memoguard" / "indexes"))


def cache_file(folder: Path, cache_dir) -> Path:
    """Where the index of `folder` is cached in `cache_dir`: named by the folder's resolved path."""
    folder = Path(folder).resolve()
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{folder.name[:40]}-{digest}.npz"
