"""POST /memoguard/v1/calibrate: the WebUI's API route for calibrating the loaded checkpoint.

The route exists only where the WebUI serves its API (`--api`, or `--nowebui`) and sits behind the same
HTTP Basic credentials as /sdapi/v1/* (`--api-auth user:pass[,user2:pass2]`). Its body is read up to
MAX_BODY_BYTES; the settings are checked by `calibrate.check_request` (every size limited, after every
source of prompts is merged). One calibration runs at a time: another request gets 409 naming who holds
it. A client that disconnects cancels its calibration (nothing is saved).
"""
import asyncio
import json
import threading
from secrets import compare_digest

from memoguard.calibration import CalibrationError

from .calibrate import MAX_BODY_BYTES, CalibrationBusy, CalibrationCancelled, calibrate_current

ROUTE = "/memoguard/v1/calibrate"


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def api_enabled(cmd_opts) -> bool:
    """The WebUI serves /sdapi/v1/* with --api, or alone with --nowebui."""
    return bool(getattr(cmd_opts, "api", False) or getattr(cmd_opts, "nowebui", False))


def credentials(api_auth: str) -> dict:
    """--api-auth "u1:p1,u2:p2" as {user: password} (a password may hold ':')."""
    pairs = {}
    for item in api_auth.split(","):
        user, sep, password = item.strip().partition(":")
        if sep:
            pairs[user] = password
    return pairs


def auth_dependencies(cmd_opts) -> list:
    """What the WebUI's own API routes depend on: HTTP Basic against --api-auth, when it is set."""
    if not getattr(cmd_opts, "api_auth", None):
        return []
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials
    allowed = credentials(cmd_opts.api_auth)

    def check(given: HTTPBasicCredentials = Depends(HTTPBasic())):
        expected = allowed.get(given.username)
        if expected is None or not compare_digest(given.password.encode(), expected.encode()):
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})

    return [Depends(check)]


async def read_settings(request) -> dict:
    """The JSON object in the body, read no further than MAX_BODY_BYTES (an empty body: all defaults)."""
    declared = request.headers.get("content-length")
    too_large = RequestError(413, f"the request body is over {MAX_BODY_BYTES // 1024} KiB")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_large
    if not body.strip():
        return {}
    try:
        settings = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"the body is not JSON: {e}") from None
    if not isinstance(settings, dict):
        raise RequestError(400, "the body must be a JSON object of calibration settings")
    return settings


async def client_left(request) -> None:
    """Returns once the client has disconnected. Waits on the ASGI receive channel itself (after the body, its next
    message is the disconnect): Request.is_disconnected never sees it behind the WebUIs' http middleware on the
    Starlette they pin (0.26)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def register_api(_demo, app) -> None:
    """script_callbacks.on_app_started: the route, where the WebUI serves its API."""
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from modules import shared
    if not api_enabled(shared.cmd_opts):
        print(f"MemoGuard: {ROUTE} is off (the WebUI serves no API: start it with --api to calibrate through "
              f"the API; the 'Calibrate this checkpoint' button works without it)")
        return

    async def calibrate_route(request: Request):
        try:
            settings = await read_settings(request)
        except RequestError as e:
            return JSONResponse(status_code=e.status, content={"error": str(e)})
        client = request.client.host if request.client else "unknown"
        cancelled = threading.Event()
        job = asyncio.get_running_loop().run_in_executor(
            None, lambda: calibrate_current(settings, requested_by=f"API client {client}", cancelled=cancelled))
        left = asyncio.ensure_future(client_left(request))
        await asyncio.wait({job, left}, return_when=asyncio.FIRST_COMPLETED)
        if not job.done():
            cancelled.set()  # the client left: the calibration stops at its next batch and saves nothing
        left.cancel()
        await asyncio.wait({job})
        try:
            return job.result()
        except CalibrationCancelled as e:
            print(f"MemoGuard: {e} ({client})")
            return JSONResponse(status_code=400, content={"error": str(e)})
        except CalibrationBusy as e:
            return JSONResponse(status_code=409, content={"error": str(e)})
        except CalibrationError as e:
            return JSONResponse(status_code=400, content={"error": str(e)})
        except Exception as e:  # reported in the log too, never a stack trace for the client only
            import traceback
            traceback.print_exc()
            return JSONResponse(status_code=500, content={"error": f"calibration failed: {type(e).__name__}: {e}"})

    app.add_api_route(ROUTE, calibrate_route, methods=["POST"], dependencies=auth_dependencies(shared.cmd_opts))
