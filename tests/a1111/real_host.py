"""Launch a real WebUI (Automatic1111 or Forge) headless on CPU and talk to its HTTP API.

The repository is installed as the user's "Install from URL" does: linked whole into the
extensions folder of a throw-away --data-dir. A probe extension beside it lists the CFG
callbacks still registered and, on Forge, the post-CFG functions on the model's UNet.
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
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 1800
PROBE = '''
from modules import script_callbacks, shared

def _routes(demo, app):
    @app.get("/memoguard-probe/cfg-callbacks")
    def cfg_callbacks():
        return {k: [c.callback.__qualname__ for c in v] for k, v in script_callbacks.callback_map.items() if "cfg" in k}

    @app.get("/memoguard-probe/forge-post-cfg")
    def forge_post_cfg():
        objects = getattr(shared.sd_model, "forge_objects_after_applying_lora", None)
        functions = [] if objects is None else objects.unet.model_options.get("sampler_post_cfg_function", [])
        return [f.__qualname__ for f in functions]

script_callbacks.on_app_started(_routes)
'''


def checkpoint(root: Path, env_var: str):
    ckpt = os.environ.get(env_var) or next(iter(sorted((root / "models" / "Stable-diffusion").glob("*.safetensors"))), None)
    if ckpt is None:
        pytest.skip(f"no checkpoint: set {env_var}")
    return ckpt


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url, payload=None, timeout=1200):
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@contextmanager
def running_webui(root: Path, python: str, flags: list, data: Path):
    """Start `launch.py` with the extension and the probe in data/extensions; yield the base URL; stop it.

    The server's output goes to data/webui.log (see `errors_logged`).
    """
    (data / "extensions").mkdir()
    (data / "extensions" / "memoguard").symlink_to(REPO, target_is_directory=True)
    (data / "extensions" / "memoguard-probe" / "scripts").mkdir(parents=True)
    (data / "extensions" / "memoguard-probe" / "scripts" / "probe.py").write_text(PROBE)
    port = _free_port()
    log = open(data / "webui.log", "w")
    server = subprocess.Popen([python, "launch.py", *flags, "--nowebui", "--port", str(port), "--data-dir", str(data)],
                              cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + STARTUP_TIMEOUT_S
    try:
        while True:
            if server.poll() is not None:
                pytest.fail(f"the WebUI exited with {server.returncode}; see {data / 'webui.log'}")
            try:
                call(base + "/sdapi/v1/samplers", timeout=10)
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


def txt2img(base, sampler, script_args=None, **overrides):
    payload = {"prompt": "a red house on a hill", "negative_prompt": "", "seed": 7, "steps": 3, "width": 64,
               "height": 64, "cfg_scale": 7, "sampler_name": sampler, "batch_size": 1, **overrides}
    if script_args is not None:
        payload.update(script_name="memoguard", script_args=script_args)
    return call(base + "/sdapi/v1/txt2img", payload)


def pixels(png_base64):
    from PIL import Image
    image = Image.open(io.BytesIO(base64.b64decode(png_base64)))
    return image.size, image.tobytes()


def fields(result):
    """The MemoGuard-relevant key/value pairs of the first image's infotext."""
    infotext = json.loads(result["info"])["infotexts"][0]
    return dict(part.split(": ", 1) for part in infotext.splitlines()[-1].split(", ") if ": " in part)


def infotext(result):
    return json.loads(result["info"])["infotexts"][0]


def errors_logged(data: Path) -> list:
    """MemoGuard's own failure lines in the server log (they also reach the user's panel and comments)."""
    return [line for line in (data / "webui.log").read_text().splitlines() if line.startswith("MemoGuard failed")]
