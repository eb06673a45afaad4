"""The extension inside a real Automatic1111 WebUI, headless on CPU, through the HTTP API.

Skipped unless A1111_DIR points to a WebUI checkout whose environment is set up (venv/ with its
requirements, repositories/ populated, a CLIP tokenizer+config in the HF cache) and a checkpoint
is found (A1111_CKPT, or the first .safetensors in A1111_DIR/models/Stable-diffusion). The
repository is installed as the user's "Install from URL" does: linked whole into the
extensions folder of a throw-away --data-dir. A probe extension beside it lists the CFG
callbacks still registered.
"""
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

A1111_DIR = os.environ.get("A1111_DIR")
pytestmark = pytest.mark.skipif(not A1111_DIR, reason="A1111_DIR is not set (path to a WebUI checkout with its environment)")
REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 1800
PROBE = '''
from modules import script_callbacks

def _routes(demo, app):
    @app.get("/memoguard-probe/cfg-callbacks")
    def cfg_callbacks():
        return {k: [c.callback.__qualname__ for c in v] for k, v in script_callbacks.callback_map.items() if "cfg" in k}

script_callbacks.on_app_started(_routes)
'''


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url, payload=None, timeout=1200):
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    root = Path(A1111_DIR)
    python = os.environ.get("A1111_PYTHON", str(root / "venv" / "bin" / "python"))
    ckpt = os.environ.get("A1111_CKPT") or next(iter(sorted((root / "models" / "Stable-diffusion").glob("*.safetensors"))), None)
    if ckpt is None:
        pytest.skip("no checkpoint: set A1111_CKPT")
    data = tmp_path_factory.mktemp("webui-data")
    (data / "extensions").mkdir()
    (data / "extensions" / "memoguard").symlink_to(REPO, target_is_directory=True)
    (data / "extensions" / "memoguard-probe" / "scripts").mkdir(parents=True)
    (data / "extensions" / "memoguard-probe" / "scripts" / "probe.py").write_text(PROBE)
    port = _free_port()
    log = open(data / "webui.log", "w")
    server = subprocess.Popen(
        [python, "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test", "--test-server",
         "--do-not-download-clip", "--no-half", "--use-cpu", "all", "--nowebui", "--port", str(port),
         "--data-dir", str(data), "--ckpt", str(ckpt)],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + STARTUP_TIMEOUT_S
    try:
        while True:
            if server.poll() is not None:
                pytest.fail(f"the WebUI exited with {server.returncode}; see {data / 'webui.log'}")
            try:
                _call(base + "/sdapi/v1/samplers", timeout=10)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"the WebUI did not answer within {STARTUP_TIMEOUT_S} s; see {data / 'webui.log'}")
                time.sleep(5)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()
        print(f"WebUI log: {data / 'webui.log'}", file=sys.stderr)


def _txt2img(base, sampler, script_args=None):
    payload = {"prompt": "a red house on a hill", "negative_prompt": "", "seed": 7, "steps": 3, "width": 64,
               "height": 64, "cfg_scale": 7, "sampler_name": sampler, "batch_size": 1}
    if script_args is not None:
        payload.update(script_name="memoguard", script_args=script_args)
    return _call(base + "/sdapi/v1/txt2img", payload)


def _pixels(png_base64):
    from PIL import Image
    image = Image.open(io.BytesIO(base64.b64decode(png_base64)))
    return image.size, image.tobytes()


def _fields(infotext):
    return dict(part.split(": ", 1) for part in infotext.splitlines()[-1].split(", ") if ": " in part)


def test_txt2img_api_scores_explains_and_leaves_the_image_unchanged(webui):
    assert "memoguard" in _call(webui + "/sdapi/v1/scripts")["txt2img"]
    plain = _txt2img(webui, "Euler")
    watched = _txt2img(webui, "Euler", [1, 0, "", 0.01, True, 1, "off", 0, 0.05, 10])
    fields = _fields(json.loads(watched["info"])["infotexts"][0])
    assert float(fields["MemoGuard score"]) > 0 and fields["MemoGuard verdict"] == "ok"
    assert fields["MemoGuard tokens"]
    print("infotext with MemoGuard:", json.loads(watched["info"])["infotexts"][0])
    assert _pixels(plain["images"][0]) == _pixels(watched["images"][0])  # the PNGs differ in their infotext chunk
    callbacks = _call(webui + "/memoguard-probe/cfg-callbacks")
    assert not any("RunMonitor" in name for names in callbacks.values() for name in names), callbacks


def test_timestep_sampler_is_scored(webui):
    fields = _fields(json.loads(_txt2img(webui, "DDIM", [1, 0, "", 0.01, False, 1, "off", 0, 0.05, 10])["info"])["infotexts"][0])
    assert float(fields["MemoGuard score"]) > 0


def test_mitigation_optimises_through_the_webui_model(webui):
    fields = _fields(json.loads(_txt2img(webui, "Euler", [1, 0, "", 0.01, False, 1, "always", 0, 0.05, 2])["info"])["infotexts"][0])
    mode, iterations, _, before, _, after = fields["MemoGuard mitigation"].split()
    assert (mode, iterations) == ("always", "2") and float(after) < float(before)
