"""The calibration route on a real FastAPI app (the WebUI's own server is FastAPI): only where the WebUI serves its
API, behind --api-auth, every size limited, one calibration at a time, a cancelled one saves nothing."""
import base64
import json
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from memoguard_a1111 import api, calibrate as calibration_glue  # noqa: E402
from memoguard.calibration import CALIBRATION_SEEDS  # noqa: E402
from modules import shared  # noqa: E402

SMALL = dict(prompts=10, band_prompts=2, steps=3, width=128, height=128)  # the tiny model's 16x16 latent
PROMPTS = [f"a photo of a red house number {i}" for i in range(10)]


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture()
def served(monkeypatch):
    """A FastAPI app with the route registered as on_app_started does, under the given command-line flags."""
    def serve(**flags):
        monkeypatch.setattr(shared, "cmd_opts", type(shared.cmd_opts)(**{"api": True, "nowebui": False,
                                                                          "api_auth": None, **flags}))
        app = FastAPI()
        api.register_api(None, app)
        return TestClient(app)
    return serve


def test_no_route_where_the_webui_serves_no_api(webui, served, capsys):
    client = served(api=False)
    assert client.post(api.ROUTE, json=SMALL).status_code == 404
    assert "start it with --api" in capsys.readouterr().out
    assert served(api=False, nowebui=True).post(api.ROUTE, json={"steps": 1}).status_code == 400  # API-only launch


def test_api_auth_guards_the_route_as_it_guards_sdapi(webui, served, models_folder):
    client = served(api_auth="alice:s3cr:et,bob:pw")
    for headers in ({}, basic("alice", "wrong"), basic("mallory", "s3cr:et")):
        refused = client.post(api.ROUTE, json=SMALL, headers=headers)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Basic"
    assert not (models_folder / "memoguard").exists()  # nothing was calibrated, nothing overwritten
    answer = client.post(api.ROUTE, json=SMALL, headers=basic("alice", "s3cr:et"))  # a password may hold ':'
    assert answer.status_code == 200, answer.text
    assert (models_folder / "memoguard" / f"{answer.json()['model_key']}.json").is_file()


@pytest.mark.parametrize("body, status, words", [
    ({"prompt_list": ["a cat"] * 200_000}, 413, "over 1024 KiB"),
    ({"prompt_list": ["x" * 5_000_000] * 10}, 413, "over 1024 KiB"),
    ({"prompts": 20, "prompt_list": [f"a cat {i}" for i in range(20_000)]}, 400, "10 to 10000 prompts, got 20000"),
    ({"prompt_list": PROMPTS[:9] + ["x" * 3000]}, 400, "prompt_list[9] has 3000 characters"),
    ({"batch_size": 10 ** 9}, 400, "batch_size must be in [1, 64]"),
    ({"batch_size": -3}, 400, "batch_size must be in [1, 64]"),
    ({"prompts": 296, "band_prompts": 10000, "steps": 150, "width": 4096, "height": 4096}, 400, "UNet evaluations"),
    ({"band_prompts": 1}, 400, "at least 2"),
])
def test_every_size_is_limited_before_any_work(webui, served, models_folder, body, status, words):
    answer = served().post(api.ROUTE, json=body)
    assert answer.status_code == status and words in answer.json()["error"]
    assert not (models_folder / "memoguard").exists()


def test_a_body_that_is_not_a_settings_object_is_refused(webui, served):
    client = served()
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        answer = client.post(api.ROUTE, content=raw, headers={"content-type": "application/json"})
        assert answer.status_code == 400 and "error" in answer.json()
    huge = client.post(api.ROUTE, content=b"{}", headers={"content-length": str(10 ** 9)})
    assert huge.status_code == 413


def test_the_prompt_count_limit_applies_to_the_merged_prompt_list(webui):
    """prompt_list replaces `prompts`: the limit is checked on what will run, not on the number it replaced."""
    with pytest.raises(calibration_glue.CalibrationError, match="10 to 10000"):
        calibration_glue.check_request({"prompts": 10, "prompt_list": ["a"] * 10_001})
    settings = calibration_glue.check_request({"prompt_list": "\n".join(PROMPTS) + "\n\n"})
    assert settings["prompts"] == 10 and settings["prompt_list"] == PROMPTS


def test_a_second_calibration_gets_409_naming_who_holds_it(webui, served, models_folder):
    assert calibration_glue.lock.acquire(blocking=False)
    calibration_glue.running.update(by="API client 10.0.0.7", since=0.0, progress="band 3/32 prompts")
    try:
        answer = served().post(api.ROUTE, json=SMALL)
    finally:
        calibration_glue.running.clear()
        calibration_glue.lock.release()
    assert answer.status_code == 409
    assert "already running" in answer.json()["error"] and "API client 10.0.0.7; band 3/32" in answer.json()["error"]
    assert served().post(api.ROUTE, json=SMALL).status_code == 200  # free again


def test_a_cancelled_calibration_stops_saves_nothing_and_frees_the_lock(webui, models_folder):
    cancelled = threading.Event()
    seen = []

    def progress(text):
        seen.append(text)
        cancelled.set()  # the client left after the first progress line

    with pytest.raises(calibration_glue.CalibrationCancelled, match="nothing was saved"):
        calibration_glue.calibrate_current(SMALL, progress, cancelled=cancelled)
    assert len(seen) == 1 and not (models_folder / "memoguard").exists()
    assert not calibration_glue.running and calibration_glue.lock.acquire(blocking=False)
    calibration_glue.lock.release()
    shared.state.interrupted = True  # the WebUI's Interrupt button
    try:
        with pytest.raises(calibration_glue.CalibrationCancelled):
            calibration_glue.calibrate_current(SMALL)
    finally:
        shared.state.interrupted = False


def test_closing_the_page_cancels_the_buttons_calibration(webui, models_folder, monkeypatch):
    """Gradio closes the generator of a page that went away: the calibration must not hold the queue on."""
    started = threading.Event()
    real = calibration_glue.calibrate_current

    def slow(settings, progress, **kw):
        def report(text):
            progress(text)
            started.set()
            kw["cancelled"].wait(10)  # the next progress line then sees the cancellation
        return real(settings, report, **kw)

    monkeypatch.setattr(calibration_glue, "calibrate_current", slow)
    shown = calibration_glue.ui_calibrate(10, 2, 3, 128, 128)
    assert "MemoGuard calibration" in next(shown)
    shown.close()
    assert calibration_glue.lock.acquire(timeout=20)  # the worker stopped and let go
    calibration_glue.lock.release()
    assert not (models_folder / "memoguard").exists()


def test_the_route_answers_the_calibration(webui, served, models_folder):
    answer = served().post(api.ROUTE, json=dict(SMALL, prompt_list=PROMPTS))
    assert answer.status_code == 200, answer.text
    got = answer.json()
    assert got["prompts"] == 10 and got["model_key"].startswith("unet-")
    assert got["saved_to"].startswith(str(models_folder))
    saved = json.loads((models_folder / "memoguard" / f"{got['model_key']}.json").read_text())
    assert len(saved["models"][got["model_key"]]["scores"]) == 10 * CALIBRATION_SEEDS  # each generation a sample


def test_a_client_that_disconnects_cancels_its_calibration_behind_the_webuis_middleware(webui, monkeypatch,
                                                                                         models_folder):
    """On a real server, behind an http middleware as the WebUIs add one (Request.is_disconnected never fires
    there on the Starlette they pin): the client closes its socket, the calibration stops, nothing is saved."""
    import socket
    import time
    uvicorn = pytest.importorskip("uvicorn")
    real, started = calibration_glue.calibrate_current, threading.Event()

    def slow(settings, progress=None, **kw):  # each batch waits until the route cancels it (or 30 s)
        def report(text):
            started.set()
            kw["cancelled"].wait(30)
            if progress:
                progress(text)
        return real(settings, report, **kw)

    monkeypatch.setattr(api, "calibrate_current", slow)
    monkeypatch.setattr(shared, "cmd_opts", type(shared.cmd_opts)(api=True, nowebui=False, api_auth=None))
    app = FastAPI()

    @app.middleware("http")
    async def passthrough(request, call_next):
        return await call_next(request)

    api.register_api(None, app)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 20
        while not server.started:
            assert time.time() < deadline
            time.sleep(0.05)
        body = json.dumps(SMALL).encode()
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"POST " + api.ROUTE.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert started.wait(20)
        client.close()
        assert calibration_glue.lock.acquire(timeout=20)  # cancelled: well before slow()'s 30 s waits end
        calibration_glue.lock.release()
        assert not (models_folder / "memoguard").exists()
    finally:
        server.should_exit = True
        thread.join(10)
