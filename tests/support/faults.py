"""Network faults between a client and a real server: an httpx transport that wraps any other (the in-process
hub's, or a real socket's) and, per scripted rule, refuses the connection, answers a status instead of
forwarding, forwards and then loses the answer, answers slowly, or answers off the contract.

Every request is logged (``requests``: method, path and what became of it), so tests can count what
reached the server. Rules match a method (None: any) and a regular expression searched in the path;
``times`` bounds how often a rule fires (None: until removed), ``when`` narrows it further::

    faults = FaultTransport(hub.transport)
    faults.add("POST", r"^/v1/labels$", "lose", times=2)       # applied, answer lost: the client retries
    faults.add(None, r"^/v1/cases", "429", retry_after=7)      # over a quota: wait 7 s
    faults.add("GET", r"/assignment$", "answer", content=b"[]") # a hub answering off the contract

Kinds: ``refuse`` (connection refused), ``lose`` (forwarded, then a read timeout), ``slow`` (forwarded after
``delay_s`` seconds or once ``gate`` is set), a status such as ``"503"`` (answered here, with
``Retry-After`` when ``retry_after`` is given), ``answer`` (these bytes instead of the server's) and ``edit``
(the server's answer passed through ``edit``).
"""

from __future__ import annotations

import json as _json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

LS_REFUSAL = {"detail": "Validation error", "validation_errors": {"injected": ["refused"]}}  # Label Studio's 400


@dataclass
class Rule:
    method: str | None
    path: re.Pattern[str]
    kind: str
    times: int | None = 1
    delay_s: float = 0.0
    gate: threading.Event | None = None
    retry_after: float | None = None
    status: int = 200
    content: bytes | None = None
    headers: dict[str, str] | None = None
    edit: Callable[[httpx.Request, httpx.Response], httpx.Response] | None = None
    when: Callable[[httpx.Request], bool] | None = None

    def matches(self, request: httpx.Request) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.method is not None and self.method != request.method:
            return False
        if not self.path.search(request.url.path):
            return False
        return self.when is None or self.when(request)


class FaultTransport(httpx.BaseTransport):
    """``inner`` (a real socket transport by default) with scripted faults in front of it."""

    def __init__(self, inner: httpx.BaseTransport | None = None) -> None:
        self._owns_inner = inner is None  # a transport handed in is shared: closing a client leaves it open
        self.inner = inner if inner is not None else httpx.HTTPTransport()
        self.rules: list[Rule] = []
        self.hits: list[tuple[str, str, str]] = []  # (method, path, kind) of every fault injected
        self.requests: list[tuple[str, str, str]] = []  # (method, path, status or fault) of every request
        self.down = False
        self._lock = threading.Lock()

    # -- scripting -----------------------------------------------------------------------------

    def add(self, method: str | None, path: str, kind: str, *, times: int | None = 1, delay_s: float = 0.0,
            gate: threading.Event | None = None, retry_after: float | None = None, json: Any = None,
            content: bytes | None = None, headers: dict[str, str] | None = None,
            edit: Callable[[httpx.Request, httpx.Response], httpx.Response] | None = None,
            when: Callable[[httpx.Request], bool] | None = None) -> Rule:
        """Add a rule (see the module docstring for the kinds); returns it, so a test can remove it."""
        status = 200
        if kind.isdigit():
            status = int(kind)
            if json is None and content is None:
                json = LS_REFUSAL if status == 400 else {"detail": f"injected fault: HTTP {status}"}
        elif kind not in ("refuse", "lose", "slow", "answer", "edit"):
            raise ValueError(f"unknown fault kind {kind!r}; expected refuse, lose, slow, answer, edit or a status")
        if json is not None:
            content = _json.dumps(json).encode()
            headers = {"content-type": "application/json", **(headers or {})}
        if retry_after is not None:
            headers = {**(headers or {}), "retry-after": f"{retry_after:g}"}
        rule = Rule(method, re.compile(path), kind, times, delay_s, gate, retry_after, status, content, headers,
                    edit, when)
        with self._lock:
            self.rules.append(rule)
        return rule

    def remove(self, rule: Rule) -> None:
        with self._lock:
            self.rules.remove(rule)

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def count(self, method: str, path: str, outcome: str | None = None) -> int:
        """How many requests ``method`` on a path matching ``path`` (a regex) passed (with ``outcome``)."""
        pattern = re.compile(path)
        return sum(1 for m, p, o in list(self.requests)
                   if m == method and pattern.search(p) and (outcome is None or o == outcome))

    # -- the transport -------------------------------------------------------------------------

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        method, path = request.method, request.url.path
        if self.down:
            self._note(method, path, "down", hit=True)
            raise httpx.ConnectError("injected: the server is down", request=request)
        rule = self._match(request)
        if rule is None:
            return self._forward(request)
        forwarded = rule.kind in ("slow", "lose", "edit")
        self._note(method, path, rule.kind, hit=True, logged=not forwarded)
        if rule.kind == "refuse":
            raise httpx.ConnectError("injected: connection refused", request=request)
        if rule.kind.isdigit() or rule.kind == "answer":
            request.read()
            return httpx.Response(rule.status, content=rule.content or b"", headers=rule.headers, request=request)
        if rule.kind == "slow":
            if rule.gate is not None:
                rule.gate.wait(rule.delay_s or 30.0)
            else:
                time.sleep(rule.delay_s)
            return self._forward(request)
        response = self._forward(request)
        response.read()
        response.close()
        if rule.kind == "lose":
            raise httpx.ReadTimeout("injected: the answer was lost", request=request)
        assert rule.kind == "edit" and rule.edit is not None
        return rule.edit(request, response)

    def close(self) -> None:
        if self._owns_inner:
            self.inner.close()

    def _match(self, request: httpx.Request) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.matches(request):
                    if rule.times is not None:
                        rule.times -= 1
                    return rule
        return None

    def _forward(self, request: httpx.Request) -> httpx.Response:
        try:
            response = self.inner.handle_request(request)
        except httpx.TransportError:
            self._note(request.method, request.url.path, "error")
            raise
        self._note(request.method, request.url.path, str(response.status_code))
        return response

    def _note(self, method: str, path: str, outcome: str, *, hit: bool = False, logged: bool = True) -> None:
        with self._lock:
            if logged:
                self.requests.append((method, path, outcome))
            if hit:
                self.hits.append((method, path, outcome))


def replaced(response: httpx.Response, *, content: bytes | None = None, headers: dict[str, str] | None = None,
             status: int | None = None) -> httpx.Response:
    """``response`` with its body, some headers or its status replaced (for ``edit`` rules)."""
    dropped = {"content-length", "content-encoding", *(k.lower() for k in headers or {})}
    merged = {k: v for k, v in response.headers.items() if k.lower() not in dropped}
    merged.update(headers or {})
    return httpx.Response(response.status_code if status is None else status, headers=merged,
                          content=response.content if content is None else content, request=response.request)
