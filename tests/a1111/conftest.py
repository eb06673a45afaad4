"""Stand-ins for the WebUI modules the extension touches (tests/a1111/standin/modules), with real torch and
the bundled tiny model behind an A1111-shaped apply_model."""
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "standin"))
sys.path.insert(0, str(HERE.parents[1] / "a1111_extension"))

from modules import script_callbacks, shared  # noqa: E402
from modules.sd_hijack import ChunkingTokenizer, model_hijack  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The bundled model when its weights are there, else the same architecture with random weights."""
    pytest.importorskip("diffusers")
    from memoguard.standalone.diffusers_model import BUNDLED_MODEL, load_model
    if (BUNDLED_MODEL / "unet").is_dir():
        return load_model()
    import torch
    from memoguard.tiny.train import build_models, save_pipeline
    torch.manual_seed(0)
    unet, text_encoder = build_models()
    folder = tmp_path_factory.mktemp("tiny-sd")
    save_pipeline(folder, unet, text_encoder, BUNDLED_MODEL / "tokenizer", {"random": True})
    return load_model(folder)


@pytest.fixture(autouse=True)
def models_folder(tmp_path, monkeypatch):
    """The WebUI's models folder (calibrations go to <models_path>/memoguard); no model key cached across tests."""
    from modules import paths
    from memoguard import identity
    monkeypatch.setattr(paths, "models_path", str(tmp_path / "models"))
    identity.forget()
    yield tmp_path / "models"
    identity.forget()


def _serve(sd_model):
    """Load `sd_model` into the stand-in WebUI with default options; clear callbacks afterwards."""
    shared.sd_model = sd_model
    shared.opts.skip_early_cond, shared.opts.s_min_uncond_all = 0.0, False
    shared.state.interrupted, shared.state.textinfo = False, None
    script_callbacks.reported.clear()
    yield sd_model
    script_callbacks.callback_map.clear()


@pytest.fixture()
def webui(tiny_model):
    """A WebUI with the tiny model loaded; options and callbacks restored after each test."""
    from webui_model import TinyLatentDiffusion
    model_hijack.clip = ChunkingTokenizer(tiny_model.tokenizers[0])
    yield from _serve(TinyLatentDiffusion(tiny_model))


def _serve_forge(model_class_name, tiny_model, monkeypatch):
    """The stand-in WebUI playing Forge: modules_forge importable, the tiny model behind forge_objects."""
    monkeypatch.syspath_prepend(str(HERE / "standin_forge"))
    import forge_model
    monkeypatch.setattr(model_hijack, "clip", None)  # Forge tokenizes through the sd_model's text processing engines
    yield from _serve(getattr(forge_model, model_class_name)(tiny_model))
    sys.modules.pop("modules_forge", None)  # find_spec would still find it there: back to A1111


@pytest.fixture()
def forge(tiny_model, monkeypatch):
    yield from _serve_forge("TinyForgeDiffusion", tiny_model, monkeypatch)


@pytest.fixture()
def forge_xl(tiny_model, monkeypatch):
    """Forge with an SDXL checkpoint: dict conds, y passed to KModel.apply_model, text_processing_engine_l."""
    yield from _serve_forge("TinyForgeXLDiffusion", tiny_model, monkeypatch)


@pytest.fixture()
def webui_xl(tiny_model):
    """The WebUI with an SDXL-shaped model: dict conditioning, model_hijack.clip its conditioner."""
    from webui_model import TinyXLDiffusion
    model = TinyXLDiffusion(tiny_model)
    model_hijack.clip = model.conditioner
    yield from _serve(model)
