"""A fault-injecting HTTP proxy on loopback, for system tests whose client is another process: it forwards
every request to a real server, except those a rule answers with a refusal instead."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}


@dataclass
class Refusal:
    method: str
    path: re.Pattern[str]
    status: int
    body: bytes


@dataclass
class Proxy:
    url: str
    rules: list[Refusal] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # "METHOD /path" of every request a rule answered

    def refuse(self, method: str, path: str, status: int = 400,
               body: bytes = b'{"detail": "Validation error", "validation_errors": {"injected": ["refused"]}}') -> None:
        self.rules.append(Refusal(method, re.compile(path), status, body))


@contextmanager
def fault_proxy(target: str) -> Iterator[Proxy]:
    """Serve a proxy to ``target`` on a free loopback port while the block runs."""
    client = httpx.Client(base_url=target.rstrip("/"), timeout=60, follow_redirects=False)
    proxy = Proxy(url="")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _handle(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            path = self.path.split("?", 1)[0]
            for rule in proxy.rules:
                if rule.method == self.command and rule.path.search(path):
                    proxy.refused.append(f"{self.command} {path}")
                    return self._answer(rule.status, {"content-type": "application/json"}, rule.body)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            headers["host"] = self.headers.get("host", "")
            r = client.request(self.command, self.path, content=body, headers=headers)
            self._answer(r.status_code, {k: v for k, v in r.headers.multi_items() if k.lower() not in HOP},
                         r.content)

        def _answer(self, status: int, headers: dict[str, str] | list[tuple[str, str]], body: bytes) -> None:
            self.send_response(status)
            for k, v in headers.items() if isinstance(headers, dict) else headers:
                self.send_header(k, v)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _handle

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
        client.close()
