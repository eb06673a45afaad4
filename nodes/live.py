"""Messages to the browser while a prompt runs. Outside a ComfyUI server they go nowhere."""
import logging

log = logging.getLogger("memoguard")


def _server():
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def send(event: str, data: dict) -> None:
    """A websocket event `memoguard.<event>` to the client that queued the prompt."""
    server = _server()
    if server is not None:
        server.send_sync(f"memoguard.{event}", data, server.client_id)


def show_text(text: str, node_id) -> None:
    """Text shown on the node itself (no front-end extension needed)."""
    server = _server()
    if server is not None and node_id is not None:
        server.send_progress_text(text, node_id)
