"""The in-process hub's ASGI plumbing: a tap recording every exchange with the app, and a loopback server for
clients that are other processes (Label Studio's webhooks, an annotator's browser, an agent subprocess)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class Exchange:
    """One request the hub answered; JSON bodies are kept (``request``/``response``), others are not."""

    method: str
    path: str
    status: int
    request: bytes = b""
    response: bytes = b""

    def request_json(self) -> Any:
        return json.loads(self.request)

    def response_json(self) -> Any:
        return json.loads(self.response)


class Tap:
    """An ASGI wrapper that records every HTTP exchange with the app (from any client: in-process or over a
    socket), keeping JSON request and response bodies up to 1 MiB."""

    LIMIT = 1 << 20

    def __init__(self, app: Any) -> None:
        self.app = app
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        keep_request = b"json" in headers.get(b"content-type", b"")
        sent, got = bytearray(), bytearray()
        status = [0]
        keep_response = [False]

        async def rx() -> Any:
            message = await receive()
            if keep_request and message["type"] == "http.request" and len(sent) < self.LIMIT:
                sent.extend(message.get("body", b""))
            return message

        async def tx(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                keep_response[0] = any(k.lower() == b"content-type" and b"json" in v for k, v in message["headers"])
            elif message["type"] == "http.response.body" and keep_response[0] and len(got) < self.LIMIT:
                got.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, rx, tx)
        finally:
            with self._lock:
                self.exchanges.append(Exchange(scope["method"], scope["path"], status[0], bytes(sent), bytes(got)))

    def find(self, method: str, path: str, *, status: int | None = None) -> list[Exchange]:
        """The exchanges of ``method`` on exactly ``path`` (answered ``status``, if given), oldest first."""
        with self._lock:
            return [x for x in self.exchanges if x.method == method and x.path == path
                    and (status is None or x.status == status)]


def free_port() -> int:
    from fleet.sim.procs import free_port as _free

    return _free()


@contextmanager
def serve_app(app: Any, *, port: int | None = None, lifespan: str = "off") -> Iterator[str]:
    """Serve an ASGI app with uvicorn on loopback in a thread; yields its URL. The lifespan is off by default:
    the in-process hub already ran it."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan=lifespan))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.02)
    if not server.started:
        raise RuntimeError(f"uvicorn did not start on port {port}")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def port_of(url: str | None) -> int | None:
    if not url:
        return None
    parsed = httpx.URL(url)
    return parsed.port if parsed.host == "127.0.0.1" else None
