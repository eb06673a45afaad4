"""The Copy Evidence node against the stand-ins: training folders come from the list, the cards and the JSON name each
image's nearest training image, a threshold set from ordinary images gives the verdict for that model only, and a
problem is a message on the node, never a stopped workflow."""
import importlib
import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

from . import harness

pytest.importorskip("imagehash")


def picture(rng, size=32):
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    root = tmp_path / "memoguard_training"
    folder = root / "my-lora"
    folder.mkdir(parents=True)
    pictures = [picture(rng) for _ in range(30)]
    for i, p in enumerate(pictures):
        Image.fromarray(p).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"photo of item {i}")
    monkeypatch.setenv("MEMOGUARD_TRAINING", str(root))
    monkeypatch.setenv("MEMOGUARD_CALIBRATIONS", str(tmp_path / "calibrations"))
    with harness.comfy_api_stand_in():
        module = importlib.import_module("nodes.nodes_evidence")
        node = module.MemoGuardCopyEvidence
        node.hidden = types.SimpleNamespace(unique_id="7")
        yield module, node, pictures, rng, tmp_path


def as_images(arrays):
    return torch.from_numpy(np.stack(arrays).astype(np.float32) / 255)


def model_of(seed):
    """A MODEL stand-in: what the node reads of it is the key of its diffusion model's weights."""
    torch.manual_seed(seed)
    return types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=torch.nn.Linear(8, 8)))


def test_cards_and_json_name_each_images_nearest_training_image(setup):
    module, node, pictures, rng, tmp_path = setup
    schema = node.define_schema()
    (folder_input,) = [i for i in schema["inputs"] if i.name == "training_images"]
    assert folder_input.options["options"] == ["my-lora"]
    out = node.execute(as_images([pictures[3], pictures[17]]), "my-lora")
    cards, data = out.args
    matches = json.loads(data)["matches"]
    assert [m["file"] for m in matches] == ["03.png", "17.png"] and matches[0]["caption"] == "photo of item 3"
    assert all(m["copy"] is None for m in matches) and "connect the model" in json.loads(data)["summary"]
    assert cards.shape[0] == 2 and cards.shape[-1] == 3 and cards.shape[2] == 560
    assert json.loads(out.ui["memoguard_evidence"][0]) == json.loads(data)
    assert (tmp_path / "calibrations" / "indexes").is_dir()  # cached with the calibrations, not beside the images


def test_a_folder_that_is_not_in_the_list_is_a_message(setup):
    module, node, pictures, rng, tmp_path = setup
    out = node.execute(as_images([pictures[0]]), str(tmp_path / "memoguard_training" / "my-lora"))
    data = json.loads(out.args[1])
    assert "not a training folder in models/memoguard_training" in data["error"]
    assert node.validate_inputs("/some/saved/path") is True  # a saved workflow still queues, the node says why


def test_the_copy_threshold_is_set_from_ordinary_images_for_that_model_only(setup):
    module, node, pictures, rng, tmp_path = setup
    ordinary = as_images([picture(rng) for _ in range(100)])
    message = json.loads(node.execute(ordinary, "my-lora", module.CALIBRATE).args[1])
    assert "needs the model input" in message["error"]
    mine, other = model_of(1), model_of(2)
    out = json.loads(node.execute(ordinary, "my-lora", module.CALIBRATE, mine).args[1])
    assert out["summary"].startswith("copy threshold for these weights and my-lora")
    copy = np.roll(pictures[5], 1, axis=0)
    judged = json.loads(node.execute(as_images([copy, picture(rng)]), "my-lora", module.JUDGE, mine).args[1])
    assert [m["copy"] for m in judged["matches"]] == [True, False]
    unjudged = json.loads(node.execute(as_images([copy]), "my-lora", module.JUDGE, other).args[1])
    assert unjudged["matches"][0]["copy"] is None and "no copy threshold" in unjudged["summary"]
