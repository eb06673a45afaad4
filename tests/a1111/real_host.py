"""Launch a real WebUI (Automatic1111 or Forge) headless on CPU and talk to its HTTP API.

The repository is installed as the user's "Install from URL" does: linked whole into the
extensions folder of a throw-away --data-dir. A probe extension beside it lists the CFG
callbacks still registered and, on Forge, the post-CFG functions on the model's UNet.
"""
import base64
import io
import json
import math
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
import importlib.util

import torch
from modules import script_callbacks, shared

_first = {}  # image 0's inputs at step 0 of the last first pass (A1111's row layout)
_last = {}   # the last generation's p (MemoGuard's monitor travels on it as p.memoguard)


def _remember(params):
    if params.denoiser is not None and getattr(params.denoiser, "p", None) is not None:
        _last["p"] = params.denoiser.p


def _capture(params):
    d = params.denoiser
    if d is None or d.step != 0 or d.p.is_hr_pass:
        return
    _first.update(x=params.x[:1].clone(), sigma=params.sigma[:1].clone(), cond=params.text_cond[:1].clone(),
                  uncond=params.text_uncond[:1].clone(), image_cond=params.image_cond[:1].clone(), wrap=d.inner_model)

def _routes(demo, app):
    @app.get("/memoguard-probe/cfg-callbacks")
    def cfg_callbacks():
        return {k: [c.callback.__qualname__ for c in v] for k, v in script_callbacks.callback_map.items() if "cfg" in k}

    @app.get("/memoguard-probe/forge-post-cfg")
    def forge_post_cfg():
        objects = getattr(shared.sd_model, "forge_objects_after_applying_lora", None)
        functions = [] if objects is None else objects.unet.model_options.get("sampler_post_cfg_function", [])
        return [f.__qualname__ for f in functions]

    @app.get("/memoguard-probe/first-step-gap")
    def first_step_gap():
        """The core's formula on the raw UNet output (eps or v, as the checkpoint's config says) at image 0's
        first step, computed apart from the CFG wrapper the extension reads its x0 / eps from."""
        from memoguard import eps_difference, step_score
        model, f = shared.sd_model, _first
        with torch.no_grad():
            if hasattr(f["wrap"], "sigma_to_t"):  # k-diffusion: x = x0 + sigma * eps, the UNet sees x / sqrt(sigma^2 + 1)
                alpha = (f["sigma"] ** 2 + 1) ** -0.5
                x, t = f["x"] * alpha, f["wrap"].sigma_to_t(f["sigma"])
            else:  # timestep samplers: sigma holds the timestep, x is the UNet's input
                alpha = model.alphas_cumprod[f["sigma"].long()].sqrt()
                x, t = f["x"], f["sigma"]
            out = [model.apply_model(x, t, cond={"c_crossattn": [c], "c_concat": [f["image_cond"]]})
                   for c in (f["cond"], f["uncond"])]
            gap = step_score(eps_difference(out[0], out[1], model.parameterization, float(alpha)))
        return {"parameterization": model.parameterization, "gap": float(gap[0])}


    @app.get("/memoguard-probe/explanation")
    def explanation():
        """Image 0's first-step score and token contributions in the last generation, at full precision."""
        monitor = _last["p"].memoguard
        out = {"score": float(monitor.results[0].trace.per_step()[0, 0])}
        for c in monitor.image_explanations(0, 0)[:1]:
            out.update(method=c.method, tokens=c.tokens, scores=c.scores, gap=c.gap_before, elements=c.elements,
                       measured=c.measured)
        return out

    @app.post("/memoguard-probe/out-of-memory/{on}")
    def out_of_memory(on: int):
        """on=1: MemoGuard's own model calls fail as on a GPU without memory left (the sampler's own calls go
        through); on=0 undoes it."""
        import sys
        oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
        for module, name in (("memoguard_a1111.host_model", "WebUIModel"), ("memoguard_a1111.forge", "ForgeModel")):
            cls = getattr(sys.modules[module], name)
            original = _unpatched.setdefault(cls, cls.raw_prediction)
            if not on:
                cls.raw_prediction = original
                continue

            def raw_prediction(self, x, t, embedding, extra, original=original):
                raise oom("CUDA out of memory. Tried to allocate 3.00 GiB (injected by the test probe)")
            cls.raw_prediction = raw_prediction
        return {"on": bool(on)}


_unpatched = {}
script_callbacks.on_app_started(_routes)
script_callbacks.on_cfg_denoiser(_remember)
if importlib.util.find_spec("modules_forge") is None:  # Forge's UNet is not called through sd_model.apply_model
    script_callbacks.on_cfg_denoiser(_capture)
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


def call(url, payload=None, timeout=1200, auth=None):
    """GET (payload None) or POST JSON; auth: (user, password) for HTTP Basic."""
    data = None if payload is None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    request = urllib.request.Request(url, data, headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


TI_NAME, TI_VECTORS = "mgvec3", 3  # a textual-inversion embedding every WebUI of the suites has (SD1's width)


def write_embedding(folder: Path) -> None:
    """TI_NAME as the WebUIs load one: a safetensors file of a single (vectors, width) tensor, named by the file."""
    import torch
    from safetensors.torch import save_file
    folder.mkdir()
    vectors = torch.randn(TI_VECTORS, 768, generator=torch.Generator().manual_seed(3)) * 0.3
    save_file({"emb_params": vectors}, str(folder / f"{TI_NAME}.safetensors"))


@contextmanager
def running_webui(root: Path, python: str, flags: list, data: Path, api_only: bool = True, select=None):
    """Start `launch.py` with the extension and the probe in data/extensions; yield the base URL; stop it.

    api_only: `--nowebui` (the API alone); else the UI, with the API only if `flags` hold --api. Ready once the
    probe's route answers (extensions' app_started callbacks have run). The server's output goes to
    data/webui.log (see `errors_logged`); its stdin is closed (a WebUI that asks a question fails instead of
    waiting); data/embeddings, the embeddings folder, holds TI_NAME.
    select: a checkpoint file to load through the options route once ready (Forge Neo loads none by
    itself).
    """
    (data / "extensions").mkdir()
    (data / "extensions" / "memoguard").symlink_to(REPO, target_is_directory=True)
    (data / "extensions" / "memoguard-probe" / "scripts").mkdir(parents=True)
    (data / "extensions" / "memoguard-probe" / "scripts" / "probe.py").write_text(PROBE)
    write_embedding(data / "embeddings")
    port = _free_port()
    log = open(data / "webui.log", "w")
    # --server-name: with --nowebui the WebUIs' API server binds 0.0.0.0 unless told otherwise
    # the UI serves its own scripts and styles by file= routes, which gradio allows only under its allowed paths:
    # the data dir by default, so a data dir outside the WebUI's folder needs the folder added (else 403s, and
    # Generate does nothing: "submit is not defined")
    ui = [] if api_only else ["--gradio-allowed-path", str(root)]
    server = subprocess.Popen([python, "launch.py", *flags, *(["--nowebui"] if api_only else ui), "--server-name",
                               "127.0.0.1", "--port", str(port), "--data-dir", str(data),
                               "--embeddings-dir", str(data / "embeddings")],
                              cwd=root, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    LOGS[base] = data / "webui.log"
    deadline = time.time() + STARTUP_TIMEOUT_S
    try:
        while True:
            if server.poll() is not None:
                pytest.fail(f"the WebUI exited with {server.returncode}; see {data / 'webui.log'}")
            try:
                call(base + "/memoguard-probe/cfg-callbacks", timeout=10)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"the WebUI did not answer within {STARTUP_TIMEOUT_S} s; see {data / 'webui.log'}")
                time.sleep(5)
        if select is not None and api_only:  # the UI alone has no API: its checkpoint dropdown chooses there
            auth = next((tuple(flags[i + 1].split(":", 1)) for i, f in enumerate(flags) if f == "--api-auth"), None)
            call(base + "/sdapi/v1/options", {"sd_model_checkpoint": Path(select).name}, auth=auth)
        yield base
    finally:
        if server.poll() is None:  # one that exited at start-up has said why in its log
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
        log.close()
        print(f"WebUI log: {data / 'webui.log'}", file=sys.stderr)


LOGS = {}  # base URL -> its server's log


def webui_log(base) -> Path:
    return LOGS[base]


def txt2img(base, sampler, script_args=None, **overrides):
    return generate(base + "/sdapi/v1/txt2img", sampler, script_args, overrides)


def img2img(base, sampler, init_png_base64, script_args=None, **overrides):
    return generate(base + "/sdapi/v1/img2img", sampler, script_args,
                     {"init_images": [init_png_base64], "denoising_strength": 0.5, **overrides})


def generate(url, sampler, script_args, overrides):
    payload = {"prompt": PROMPT, "negative_prompt": "", "seed": 7, "steps": 3, "width": 64,
               "height": 64, "cfg_scale": 7, "sampler_name": sampler, "batch_size": 1, **overrides}
    if script_args is not None:
        payload.update(script_name="memoguard", script_args=script_args)
    return call(url, payload)


PROMPT = "a red house on a hill"
# 64 -> 128 with the latent upscaler (no upscaler weights needed), 2 second-pass steps
HIRES = dict(enable_hr=True, hr_scale=2, hr_upscaler="Latent", hr_second_pass_steps=2, denoising_strength=0.5)
MONITOR_ONLY = [1, 0, "", 0.01, False, 1, "off", 0, 0.05, 10]


def launch_flags(host: str, ckpt, api_only: bool = True) -> list:
    """launch.py's flags for a headless CPU run of `host` ("a1111", "forge" or "forge-neo") with checkpoint `ckpt`.
    Forge Neo has no --ckpt (argparse would take it for --ckpt-dirs): its folder is listed and running_webui picks
    the checkpoint through the options route."""
    if host == "forge-neo":
        return ["--skip-prepare-environment", "--skip-version-check", "--cpu", "--ckpt-dirs", str(Path(ckpt).parent)]
    if host == "forge":
        return ["--skip-prepare-environment", "--skip-torch-cuda-test", "--skip-version-check", "--always-cpu",
                "--no-half", "--ckpt", str(ckpt)]
    # --test-server turns the API on (configure_for_tests adds --api): a launch without the API goes without it
    return ["--skip-prepare-environment", "--skip-torch-cuda-test", *(["--test-server"] if api_only else []),
            "--do-not-download-clip", "--no-half", "--use-cpu", "all", "--ckpt", str(ckpt)]


@contextmanager
def a1111(tmp_path_factory, ckpt_env: str, required: bool = False, extra_flags=(), api_only: bool = True):
    """A1111_DIR's WebUI on CPU with the checkpoint named by ckpt_env (skip when unset and required)."""
    root = Path(os.environ["A1111_DIR"])
    if required and not os.environ.get(ckpt_env):
        pytest.skip(f"{ckpt_env} is not set")
    python = os.environ.get("A1111_PYTHON", str(root / "venv" / "bin" / "python"))
    flags = [*launch_flags("a1111", checkpoint(root, ckpt_env), api_only), *extra_flags]
    data = tmp_path_factory.mktemp("webui-data")
    with running_webui(root, python, flags, data, api_only) as base:
        yield base
        assert not errors_logged(data)


def assert_core_gap(base, result):
    """The infotext score (4 decimals) is the core's formula on the raw UNet outputs of the first step."""
    score = float(fields(result)["MemoGuard score"])
    probe = call(base + "/memoguard-probe/first-step-gap")
    assert math.isfinite(score) and score > 0
    assert abs(score - probe["gap"]) <= 1e-4 + 1e-3 * probe["gap"], (score, probe)
    return probe


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
