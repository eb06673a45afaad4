"""The extension inside a real Automatic1111 WebUI, headless on CPU, through the HTTP API.

Skipped unless A1111_DIR points to a WebUI checkout whose environment is set up (venv/ with its
requirements, repositories/ populated, a CLIP tokenizer+config in the HF cache) and a checkpoint
is found (A1111_CKPT, or the first .safetensors in A1111_DIR/models/Stable-diffusion).
"""
import os
from pathlib import Path

import pytest

from real_host import call, checkpoint, fields, infotext, pixels, running_webui, txt2img

A1111_DIR = os.environ.get("A1111_DIR")
pytestmark = pytest.mark.skipif(not A1111_DIR, reason="A1111_DIR is not set (path to a WebUI checkout with its environment)")


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    root = Path(A1111_DIR)
    python = os.environ.get("A1111_PYTHON", str(root / "venv" / "bin" / "python"))
    flags = ["--skip-prepare-environment", "--skip-torch-cuda-test", "--test-server", "--do-not-download-clip",
             "--no-half", "--use-cpu", "all", "--ckpt", str(checkpoint(root, "A1111_CKPT"))]
    with running_webui(root, python, flags, tmp_path_factory.mktemp("webui-data")) as base:
        yield base


def test_txt2img_api_scores_explains_and_leaves_the_image_unchanged(webui):
    assert "memoguard" in call(webui + "/sdapi/v1/scripts")["txt2img"]
    plain = txt2img(webui, "Euler")
    watched = txt2img(webui, "Euler", [1, 0, "", 0.01, True, 1, "off", 0, 0.05, 10])
    got = fields(watched)
    assert float(got["MemoGuard score"]) > 0 and got["MemoGuard verdict"] == "ok"
    assert got["MemoGuard tokens"]
    print("infotext with MemoGuard:", infotext(watched))
    assert pixels(plain["images"][0]) == pixels(watched["images"][0])  # the PNGs differ in their infotext chunk
    callbacks = call(webui + "/memoguard-probe/cfg-callbacks")
    assert not any("RunMonitor" in name for names in callbacks.values() for name in names), callbacks


def test_timestep_sampler_is_scored(webui):
    assert float(fields(txt2img(webui, "DDIM", [1, 0, "", 0.01, False, 1, "off", 0, 0.05, 10]))["MemoGuard score"]) > 0


def test_mitigation_optimises_through_the_webui_model(webui):
    got = fields(txt2img(webui, "Euler", [1, 0, "", 0.01, False, 1, "always", 0, 0.05, 2]))
    mode, iterations, _, before, _, after = got["MemoGuard mitigation"].split()
    assert (mode, iterations) == ("always", "2") and float(after) < float(before)
