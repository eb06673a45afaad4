"""The DiffusionModel adapter over ComfyUI's model under ComfyUI's inference mode, and calibration choices."""
import json

import pytest
import torch

from memoguard import PromptEncoding, token_contributions
from nodes.calibration_choice import CalibrationSource
from memoguard.host_autograd import differentiable
from nodes.comfy_model import CHUNK, ComfyDiffusionModel
from . import harness


def encoding(embedding, words):
    """A one-chunk prompt: BOS, `words` prompt tokens, then EOS/padding."""
    positions = torch.arange(embedding.shape[1])
    prompt = ((positions >= 1) & (positions <= words)).expand(embedding.shape[0], -1)
    return PromptEncoding(embedding, [[f"t{i}" for i in range(embedding.shape[1])]] * embedding.shape[0],
                          prompt, (positions % CHUNK == 0).expand(embedding.shape[0], -1))


@pytest.fixture(scope="module")
def inference_model():
    """Weights created the way ComfyUI runs nodes: as inference tensors."""
    with torch.inference_mode():
        unet, _ = harness.tiny_unet()
        base = harness.BaseModel(unet)
    assert next(base.parameters()).is_inference()
    return base


def test_token_contributions_need_and_get_the_gradient_route(inference_model):
    torch.manual_seed(3)
    sigmas = harness.schedule(inference_model, 5)
    with torch.inference_mode():
        cond, uncond, noise = torch.randn(1, 77, 64), torch.randn(1, 77, 64), torch.randn(1, 3, 16, 16)
        adapter = ComfyDiffusionModel(inference_model, sigmas)
        with pytest.raises(RuntimeError, match="does not require grad|[Ii]nference tensor"):
            token_contributions(adapter, encoding(cond, 4), encoding(uncond, 0), adapter.initial_x(noise),
                                total_steps=5, method="gradient_norm")
        with differentiable(inference_model):
            x_T = adapter.initial_x(noise.clone())
            result = token_contributions(adapter, encoding(cond.clone(), 4), encoding(uncond.clone(), 0), x_T,
                                         steps=2, total_steps=5, method="gradient_norm")[0]
    assert result.tokens == ["t1", "t2", "t3", "t4"]
    assert all(s > 0 for s in result.scores) and sum(result.shares) == pytest.approx(1.0)


def test_adapter_matches_comfy_conventions(inference_model):
    sigmas = harness.schedule(inference_model, 4)
    adapter = ComfyDiffusionModel(inference_model, sigmas)
    alpha, sigma = adapter.coefficients(sigmas[:2])
    assert torch.equal(alpha, torch.ones(2)) and torch.equal(sigma, sigmas[:2])
    with pytest.raises(ValueError, match="4-step schedule, not 6"):
        adapter.timesteps(6)


def test_calibration_choices_never_raise(tmp_path):
    key = "unet-0123456789abcdef"
    assert CalibrationSource("none").resolve(key) == (None, "calibration 'none' chosen: raw score only")
    cal, note = CalibrationSource("file", str(tmp_path / "missing.json")).resolve(key)
    assert cal is None and "not found" in note
    (tmp_path / "bad.json").write_text("{")
    assert "unreadable" in CalibrationSource("file", str(tmp_path / "bad.json")).resolve(key)[1]
    assert "no calibration_file" in CalibrationSource("file", "  ").resolve(key)[1]
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"format": 1, "models": {key: {"scores": [0.01 * i for i in range(1, 101)]}}}))
    cal, note = CalibrationSource("file", str(good)).resolve(key)
    assert cal.model_key == key and str(good) in note
    cal, note = CalibrationSource("file", str(good)).resolve("unet-ffffffffffffffff")
    assert cal is None and "another model" in note and key in note
    cal, note = CalibrationSource("auto", folders=[tmp_path]).resolve("unet-ffffffffffffffff")
    assert cal is None and "no calibration for this model" in note and "MemoGuard Calibrate" in note
    with pytest.raises(ValueError, match="calibration must be one of"):
        CalibrationSource("bundled tiny model")


def test_pack_modules_import_without_diffusers_or_transformers():
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys; import nodes.monitor_hook, nodes.mitigation_hook, nodes.comfy_model, nodes.tiny_loader, "
            "nodes.plots, nodes.calibration_choice, nodes.live, nodes.calibration_run, nodes.latents; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
