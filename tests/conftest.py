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
