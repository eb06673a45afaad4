"""Shared fixtures: the bundled model and a random-weight copy of its architecture, both loaded
through the real diffusers/transformers path."""
from pathlib import Path

import pytest
import torch

from memoguard.standalone.diffusers_model import BUNDLED_MODEL, load_model


@pytest.fixture(scope="session")
def tiny_model():
    """The bundled memorizing model."""
    return load_model()


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory) -> Path:
    """The bundled architecture with random weights, saved as a diffusers folder."""
    from memoguard.tiny.train import build_models, save_pipeline
    torch.manual_seed(0)
    unet, text_encoder = build_models()
    out = tmp_path_factory.mktemp("random-sd")
    save_pipeline(out, unet, text_encoder, BUNDLED_MODEL / "tokenizer", meta={})
    return out


@pytest.fixture(scope="session")
def random_model(random_model_dir):
    return load_model(random_model_dir)


def _valid_entry() -> dict:
    from memoguard.calibration import Band
    band = Band([3.0, 2.0, 1.0], [0.1, 0.2, 0.3], [0.2, 0.3, 0.4], 0.01, {"guidance": 7.5, "runs": 4})
    return {"scores": [0.01 * (i + 1) for i in range(20)], "window": 1, "guidance": 7.5, "meta": {"prompts": 20},
            "conditions": {"prediction": "eps", "noise_level": 14.6, "latent": [4, 16, 16]}, "band": band.to_dict(),
            "other_levels": {"11.0": [0.02 * (i + 1) for i in range(20)]}}


def _hostile_files(key: str):
    """(label, file bytes, words the message must hold) for calibration files written to break a reader: wrong
    types, NaN, huge lists, truncated JSON. Each names `key` so that a lookup by key reaches it."""
    import json

    def with_entry(**change):
        entry = {**_valid_entry(), **change}
        return json.dumps({"format": 2, "models": {key: entry}}).encode()

    band = _valid_entry()["band"]
    return [
        ("other_levels a list", with_entry(other_levels=[]), "other_levels must be a JSON object"),
        ("entry a list", json.dumps({"format": 2, "models": {key: [1, 2]}}).encode(), f"models[{key}] must be a JSON"),
        ("band medians strings", with_entry(band={**band, "median": ["0.1", "0.2", "0.3"]}),
         "band.median[0] must be a finite number"),
        ("scores strings", with_entry(scores=[str(0.01 * i) for i in range(20)]), "scores[0] must be a finite number"),
        ("negative window", with_entry(window=-5), "window must be a whole number"),
        ("NaN score", json.dumps({"format": 2, "models": {key: {**_valid_entry(), "scores": [float("nan")] * 20}}})
         .encode(), "NaN is not a number JSON allows"),
        ("huge score list", with_entry(scores=[0.1] * 100_001), "scores must hold 10 to 100000 numbers"),
        ("truncated", with_entry()[:-40], "unreadable"),
        ("deep nesting", b"[" * 100_000 + b"]" * 100_000, "unreadable"),
        ("bad latent", with_entry(conditions={"latent": "16x16"}), "conditions.latent must be a list"),
        ("bad prediction", with_entry(conditions={"prediction": {"x": 1}}), "conditions.prediction must be one of"),
    ]


@pytest.fixture(scope="session")
def hostile_calibration_files():
    """_hostile_files as a fixture, for the host tests (tests/a1111 and tests/comfyui)."""
    return _hostile_files


@pytest.fixture()
def valid_calibration_entry():
    return _valid_entry()
