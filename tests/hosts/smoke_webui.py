"""Launch check for a real WebUI set up by setup_a1111.sh / setup_forge.sh: start it headless on CPU,
offline, bound to 127.0.0.1, run a 64x64 3-step Euler txt2img through /sdapi/v1/txt2img for two prompts
at one seed, and check that both images come back and differ (a checkpoint whose UNet ignores the prompt,
e.g. with zero-initialised output layers, would make every MemoGuard identity test pass trivially).

    VENV_DIR/bin/python tests/hosts/smoke_webui.py a1111|forge SRC_DIR VENV_DIR CKPT [--hf-home DIR] [--port N] [--keep-log PATH]

Needs only Pillow (run it with the WebUI's venv python); exits non-zero on failure. Prints start-up and generation times.
"""
import argparse
import base64
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from PIL import Image

FLAGS = {
    "a1111": ["--skip-prepare-environment", "--skip-torch-cuda-test", "--test-server", "--do-not-download-clip",
              "--no-half", "--use-cpu", "all"],
    "forge": ["--skip-prepare-environment", "--skip-torch-cuda-test", "--skip-version-check", "--always-cpu",
              "--no-half"],
}


def call(url, payload=None, timeout=1800):
    data = None if payload is None else json.dumps(payload).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data, {"Content-Type": "application/json"}),
                                timeout=timeout) as r:
        return json.loads(r.read())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=FLAGS)
    ap.add_argument("src")
    ap.add_argument("venv")
    ap.add_argument("ckpt")
    ap.add_argument("--hf-home", default=None)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--keep-log", default=None)
    ap.add_argument("--startup-timeout", type=int, default=1800)
    a = ap.parse_args()
    port = a.port or free_port()
    data = tempfile.mkdtemp(prefix=f"smoke-{a.kind}-")
    log_path = a.keep_log or os.path.join(data, "webui.log")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if a.hf_home:
        env["HF_HOME"] = a.hf_home
    # --api without --nowebui also builds the gradio UI: what a user runs. --server-name: 127.0.0.1 only (with
    # --nowebui the WebUIs would otherwise bind 0.0.0.0).
    cmd = [os.path.join(a.venv, "bin", "python"), "launch.py", *FLAGS[a.kind], "--api", "--server-name", "127.0.0.1", "--port", str(port),
           "--data-dir", data, "--ckpt", a.ckpt]
    print("$", " ".join(cmd), flush=True)
    log = open(log_path, "w")
    t0 = time.time()
    server = subprocess.Popen(cmd, cwd=a.src, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if server.poll() is not None:
                sys.exit(f"the WebUI exited with {server.returncode}; log: {log_path}")
            try:
                call(base + "/sdapi/v1/sd-models", timeout=10)
                break
            except OSError:
                if time.time() - t0 > a.startup_timeout:
                    sys.exit(f"no answer within {a.startup_timeout} s; log: {log_path}")
                time.sleep(3)
        print(f"up in {time.time() - t0:.0f} s; models: {[m['title'] for m in call(base + '/sdapi/v1/sd-models')]}", flush=True)
        digests = []
        for prompt in ("a red house on a hill", "a blue car in the snow"):
            t1 = time.time()
            r = call(base + "/sdapi/v1/txt2img", {"prompt": prompt, "negative_prompt": "", "seed": 7, "steps": 3,
                                                 "width": 64, "height": 64, "cfg_scale": 7, "sampler_name": "Euler"})
            png = base64.b64decode(r["images"][0])
            from_info = json.loads(r["info"])["infotexts"][0]
            im = Image.open(io.BytesIO(png))  # pixels, not PNG bytes: the infotext chunk differs anyway
            size, pixels = im.size, im.tobytes()
            digests.append(hashlib.sha256(pixels).hexdigest())
            print(f"{prompt!r}: {time.time() - t1:.0f} s, size {size}, sha256 {digests[-1][:16]}\n  {from_info}", flush=True)
        if digests[0] == digests[1]:
            sys.exit("FAIL: two prompts gave the same image (the UNet ignores the prompt?)")
        print("OK: two prompts, one seed, different images")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
        print(f"log: {log_path}")


if __name__ == "__main__":
    main()
