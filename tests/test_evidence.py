"""Copy evidence (memoguard.evidence, `memoguard index`, `generate --training-images`): the training-image index finds
the image a copy reproduces, is keyed to the folder's contents, resumes, never trusts its cache, and its copy verdict
is calibrated on ordinary generations."""
import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("imagehash")

from memoguard import evidence  # noqa: E402
from memoguard.cli import main as cli  # noqa: E402
from memoguard.evidence import TrainingIndex, cache_file  # noqa: E402


def picture(rng, size=64):
    """A smooth random picture (low-resolution noise upscaled): photos' statistics, unlike white noise."""
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))


def regenerated(image, rng):
    """What separates a regenerated copy from its source: a shift of a few pixels, noise, another resolution."""
    shifted = np.roll(image, (2, -1), axis=(0, 1)).astype(np.float32) + rng.normal(0, 10, image.shape)
    return np.asarray(Image.fromarray(np.clip(shifted, 0, 255).astype(np.uint8)).resize((96, 96)))


@pytest.fixture()
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "dataset" / "10_subject"
    folder.mkdir(parents=True)
    images = [picture(rng) for _ in range(60)]
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"img{i:02d}.png" if i % 2 else folder / f"img{i:02d}.jpg")
        if i % 3:
            (folder / f"img{i:02d}.txt").write_text(f"a picture number {i}\n")
    (folder / "img00.caption").write_text("the first picture")
    return tmp_path / "dataset", images


def test_the_nearest_training_image_of_a_regenerated_copy_is_its_source(dataset, tmp_path):
    folder, images = dataset
    index = TrainingIndex.open(folder, tmp_path / "cache")
    assert len(index) == 60 and index.files[0] == "10_subject/img00.jpg"
    assert index.captions[0] == "the first picture" and index.captions[1] == "a picture number 1"
    assert index.captions[3] == ""  # no caption file
    rng = np.random.default_rng(1)
    copies = np.stack([regenerated(images[i], rng) for i in range(0, 60, 7)])
    matches = index.nearest(copies)
    assert [m.file[-9:-4] for m in matches] == [f"img{i:02d}" for i in range(0, 60, 7)]
    assert all(m.copy is None and m.threshold is None for m in matches)  # no threshold: no verdict
    exact = index.nearest(np.stack(images[5:6]))[0]
    assert exact.similarity > 0.999 and exact.hash_distance <= 2 and exact.ratio < 0.05
    others = index.nearest(np.stack([picture(rng) for _ in range(5)]))
    assert all(m.ratio > exact.ratio and m.similarity < exact.similarity for m in others)


def test_the_index_follows_the_folders_contents_and_reuses_the_rest(dataset, tmp_path, monkeypatch):
    folder, images = dataset
    cache = tmp_path / "cache"
    first = TrainingIndex.open(folder, cache)
    described = []
    inner = evidence._describe
    monkeypatch.setattr(evidence, "_describe", lambda batch, bad: described.extend(n for n, _, _ in batch)
                        or inner(batch, bad))
    again = TrainingIndex.open(folder, cache)
    assert described == [] and np.array_equal(again.thumbnails, first.thumbnails)
    sub = folder / "10_subject"
    rng = np.random.default_rng(2)
    Image.fromarray(picture(rng)).save(sub / "img01.png")  # changed in place
    (sub / "img02.jpg").unlink()
    Image.fromarray(picture(rng)).save(sub / "new.png")
    (folder / ".hidden").mkdir()
    Image.fromarray(picture(rng)).save(folder / ".hidden" / "skip.png")
    changed = TrainingIndex.open(folder, cache)
    assert sorted(described) == ["10_subject/img01.png", "10_subject/new.png"]
    assert len(changed) == 60 and "10_subject/img02.jpg" not in changed.files
    k = changed.files.index("10_subject/img01.png")
    assert not np.allclose(changed.thumbnails[k], first.thumbnails[first.files.index("10_subject/img01.png")])
    assert changed.contents != first.contents


def test_an_interrupted_build_resumes_where_it_stopped(dataset, tmp_path, monkeypatch):
    folder, _ = dataset
    cache = tmp_path / "cache"
    monkeypatch.setattr(evidence, "BATCH", 16)
    calls = iter([False, True])
    with pytest.raises(InterruptedError, match="saved"):
        TrainingIndex.open(folder, cache, should_stop=lambda: next(calls))
    partial = TrainingIndex.load(cache_file(folder, cache))
    assert len(partial) == 16
    described = []
    inner = evidence._describe
    monkeypatch.setattr(evidence, "_describe", lambda batch, bad: described.extend(batch) or inner(batch, bad))
    done = TrainingIndex.open(folder, cache)
    assert len(done) == 60 and len(described) == 60 - len(partial)


def test_a_broken_or_foreign_cache_is_rebuilt_never_trusted(dataset, tmp_path):
    folder, _ = dataset
    cache = tmp_path / "cache"
    good = TrainingIndex.open(folder, cache)
    path = cache_file(folder, cache)
    path.write_bytes(b"not an index")
    assert TrainingIndex.load(path) is None
    assert np.array_equal(TrainingIndex.open(folder, cache).thumbnails, good.thumbnails)
    np.savez(path, header=np.frombuffer(json.dumps({"format": 1, "folder": str(folder.resolve()), "files": ["x"],
                                                    "stamps": [[1, 2]], "captions": ["c"], "copy_thresholds": {},
                                                    "thumbnail": 16}).encode(), np.uint8),
             thumbnails=np.zeros((2, 768), np.float32), hashes=np.zeros((1, 8), np.uint8))  # lengths disagree
    assert TrainingIndex.load(path) is None
    foreign = TrainingIndex(tmp_path / "elsewhere", ["10_subject/img00.jpg"], [good.stamps[0]], ["stolen"],
                            np.zeros((1, 768), np.float32), np.zeros((1, 8), np.uint8))
    foreign.save(path)  # another folder's index under this folder's name
    assert TrainingIndex.open(folder, cache).captions[0] == "the first picture"


def test_an_unreadable_image_is_named_and_skipped(dataset, tmp_path):
    folder, _ = dataset
    (folder / "10_subject" / "broken.png").write_bytes(b"\x89PNG not really")
    index = TrainingIndex.open(folder, tmp_path / "cache")
    assert len(index) == 60 and any(u.startswith("10_subject/broken.png") for u in index.unreadable)


def test_the_copy_threshold_is_calibrated_on_ordinary_generations_and_keyed_to_model_and_contents(dataset, tmp_path):
    folder, images = dataset
    index = TrainingIndex.open(folder, tmp_path / "cache")
    rng = np.random.default_rng(3)
    ordinary = np.stack([picture(rng) for _ in range(100)])
    threshold = index.calibrate_copies("unet-a", ordinary, fpr=0.01)
    ratios = index.neighbours(ordinary)[2]
    assert (ratios <= threshold).sum() <= 1  # at most 1 % of the ordinary generations
    copy = index.nearest(regenerated(images[4], rng)[None], "unet-a")[0]
    assert copy.copy and copy.threshold == threshold
    assert index.nearest(regenerated(images[4], rng)[None], "unet-b")[0].copy is None  # another model: no verdict
    with pytest.raises(evidence.IndexError_, match="at least 100"):
        index.calibrate_copies("unet-a", ordinary[:50], fpr=0.01)
    index.save(cache_file(folder, tmp_path / "cache"))
    Image.fromarray(picture(rng)).save(folder / "10_subject" / "added.png")
    changed = TrainingIndex.open(folder, tmp_path / "cache")
    assert "unet-a" in changed.copy_thresholds and changed.copy_threshold("unet-a") is None  # the folder changed


def test_cli_index_lists_near_duplicates(dataset, tmp_path, capsys):
    folder, images = dataset
    Image.fromarray(images[7]).save(folder / "10_subject" / "again.png")
    assert cli(["index", str(folder), "--cache", str(tmp_path / "cache"), "--duplicates"]) == 0
    out = capsys.readouterr().out
    assert "61 images (41 with captions)" in out
    assert "1 near-duplicate pairs" in out and "10_subject/again.png  10_subject/img07.png" in out


def test_cli_generate_names_the_training_image_a_memorized_caption_copies(tmp_path, capsys):
    from memoguard.tiny.evalsets import eval_set
    shapes = eval_set("shapes")
    folder, cache = tmp_path / "train", tmp_path / "cache"
    assert cli(["index", str(folder), "--write-evaluation-set", "shapes", "--cache", str(cache), "--calibrate",
                "--generations", "20", "--fpr", "0.1", "--steps", "10"]) == 0
    out = capsys.readouterr().out
    assert f"{len(shapes.train_images)} images ({len(shapes.train_images)} with captions)" in out
    assert "copy threshold for tiny-sd" in out
    caption = shapes.dataset.memorized_captions[0]
    out = tmp_path / "out"
    assert cli(["generate", "--prompt", caption, "--seeds", "0,1,2,3", "--steps", "20", "--training-images",
                str(folder), "--index-cache", str(cache), "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    images = np.stack([np.asarray(Image.open(out / r["file"]), np.float32) / 255 for r in records])
    source, _, _ = __import__("memoguard.tiny.judge", fromlist=["x"]).nearest_training(images, shapes.train_images)
    copies = shapes.is_copy(images)
    assert copies.any()
    for record, is_copy, src in zip(records, copies, source):
        nearest = record["nearest_training_image"]
        assert nearest["threshold"] is not None and nearest["copy"] == (nearest["ratio"] <= nearest["threshold"])
        if is_copy:
            assert nearest["file"] == f"{src:05d}.png"
    png = json.loads(Image.open(out / records[0]["file"]).text["memoguard"])
    assert png["nearest_training_image"] == records[0]["nearest_training_image"]
