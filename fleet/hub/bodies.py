"""Limits on what a request may carry, checked before anything is parsed: size, read time, encoding, JSON depth.

Two layers, so that no body reaches a parser unchecked:

- :class:`BodyGuard`, an ASGI wrapper around the whole app: a per-route size limit (413, also for
  chunked bodies without Content-Length), a deadline for receiving the whole body (408 and the
  connection closed, so a client that sends half a body and stalls does not hold a connection),
  and for every JSON body (``application/json``, ``*+json`` or no Content-Type) the checks of
  :func:`check_json_text` before FastAPI parses it. What it refuses is a fault of fleet.errors
  (PayloadTooLarge, RequestTimeout, UnsupportedMedia, InvalidInput), answered with the status the
  whole hub answers it with (:func:`fleet.errors.status_for`), before FastAPI, or by the app's
  handler when the app is the one reading the body.
- :func:`parse_json` for JSON that arrives inside something else (a multipart part, the webhook
  body, a stored event): the same size, encoding and depth checks, then ``json.loads``.

JSON must be UTF-8 without a byte-order mark (RFC 8259), and nest at most ``max_json_depth``
levels: Python's parser and FastAPI's encoder recurse once per level, and a body nested a few
hundred levels deep would otherwise end in a RecursionError (a 500) when parsed or sent back.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import numpy as np
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleet.errors import (
    FlywheelError,
    InvalidInput,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMedia,
    headers_for,
    status_for,
)
from fleet.hub.settings import HubSettings

_BOMS = ((b"\xef\xbb\xbf", "UTF-8 with a byte-order mark"), (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))
# a JSON string literal, unrolled so that long strings match in one step
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """How deeply ``text`` nests arrays and objects (brackets inside strings do not count).

    Vectorised: strings are cut out with one regular expression, then the running bracket count is
    a cumulative sum, so a 4 MiB body is measured in milliseconds without recursing.
    """
    if "[" not in text and "{" not in text:
        return 0
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).encode("ascii")
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def decode_json_bytes(raw: bytes, what: str) -> str:
    """``raw`` as text, or :class:`UnsupportedMedia` saying it is not UTF-8 JSON (UTF-16, a BOM, invalid bytes)."""
    for bom, name in _BOMS:
        if raw.startswith(bom):
            raise UnsupportedMedia(f"{what} is {name}; expected UTF-8 JSON without a byte-order mark "
                                   f"(received {len(raw)} bytes starting {raw[:8]!r})")
    if len(raw) >= 2 and (raw[0] == 0 or raw[1] == 0):
        raise UnsupportedMedia(f"{what} holds NUL bytes at its start (UTF-16 or UTF-32?); expected UTF-8 JSON "
                               f"(received {len(raw)} bytes starting {raw[:8]!r})")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnsupportedMedia(f"{what} is not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 4]!r}); "
                               f"expected UTF-8 JSON") from None


def check_json_text(raw: bytes | str, what: str, *, max_bytes: int, max_depth: int) -> str:
    """Size, encoding and nesting checks of a JSON document, before it is parsed; returns its text."""
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"{what} is {len(raw)} bytes; the limit is {max_bytes}")
    text = decode_json_bytes(raw, what) if isinstance(raw, bytes) else raw
    if text.count("[") + text.count("{") <= max_depth:  # cannot nest deeper than it has brackets
        return text
    depth = json_depth(text)
    if depth > max_depth:
        raise InvalidInput(f"{what} nests arrays/objects {depth} levels deep; the limit is {max_depth}")
    return text


def parse_json(raw: bytes | str, what: str, *, max_bytes: int, max_depth: int,
               invalid: type[FlywheelError] = InvalidInput) -> Any:
    """Check ``raw`` (see :func:`check_json_text`) and parse it; every failure is a permanent fault naming
    ``what`` (``invalid`` for text that is not JSON at all)."""
    text = check_json_text(raw, what, max_bytes=max_bytes, max_depth=max_depth)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: also ints past Python's digit limit
        raise invalid(f"{what} is not valid JSON ({str(exc)[:200]}); received {text[:60]!r}") from None


def loads_or_none(text: str, *, max_depth: int) -> tuple[Any, str | None]:
    """Parse stored JSON without ever raising: (value, None), or (None, why it cannot be read)."""
    try:
        depth = json_depth(text)
        if depth > max_depth:
            return None, f"nested {depth} levels deep (limit {max_depth})"
        return json.loads(text), None
    except (ValueError, RecursionError, TypeError) as exc:
        return None, f"not valid JSON ({str(exc)[:200]})"


# ---------------------------------------------------------------------------------------------
# the ASGI guard
# ---------------------------------------------------------------------------------------------


class BodyGuard:
    """Size limit, read deadline and JSON checks for every request body, before the app reads it."""

    def __init__(self, app: ASGIApp, settings: HubSettings) -> None:
        self.app = app
        self.settings = settings

    def limit_for(self, path: str, method: str) -> int:
        s = self.settings
        route = path.rstrip("/")
        if method == "POST" and route == "/v1/models":
            return s.max_model_bytes + s.max_json_bytes
        if method == "POST" and route == "/v1/cases":
            return s.max_image_bytes + s.max_json_bytes
        if method == "POST" and route == "/v1/cases/batch":
            return s.max_batch_bytes
        if method == "PUT" and route.startswith("/v1/models/") and route.endswith("/novelty-bank"):
            return s.max_bank_bytes
        return s.max_json_bytes

    def timeout_for(self, path: str, method: str) -> float:
        if method == "POST" and path.rstrip("/") == "/v1/models":
            return self.settings.model_body_timeout_s
        return self.settings.body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"], scope["method"])
        timeout = self.timeout_for(scope["path"], scope["method"])
        headers = dict(scope.get("headers", []))
        declared = _content_length(headers.get(b"content-length"))
        if declared is not None and declared > limit:
            await _refuse(send, PayloadTooLarge(f"request body of {declared} bytes is over this route's limit of "
                                                f"{limit} bytes"))
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = 0
        done = False

        async def guarded_receive() -> Message:
            nonlocal seen, done
            if done:  # the body is in; what follows (a disconnect) may wait as long as it likes
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):  # no task per message, unlike wait_for
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(f"request body not received within {timeout:g} s (received {seen} bytes"
                                     f"{f' of {declared}' if declared is not None else ''}); send it faster or "
                                     f"in smaller requests") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(f"request body of more than {limit} bytes is over this route's limit")
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        started = False
        has_body = bool(declared) or b"chunked" in headers.get(b"transfer-encoding", b"").lower()

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if has_body and not done:  # answered before the body was read: never wait for the rest
                    message = {**message, "headers": _with_close(message.get("headers", []))}
            await send(message)

        try:
            if _is_json(headers.get(b"content-type")) and scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
                guarded_receive = await self._checked_json(guarded_receive)
            await self.app(scope, guarded_receive, tracking_send)
        except FlywheelError as exc:  # refused here, before the app (the app answers its own refusals)
            if not started:
                await _refuse(send, exc)

    async def _checked_json(self, receive: Receive) -> Receive:
        """Read the whole (bounded) JSON body, check it, and hand the app a receive that replays it."""
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body:
            check_json_text(body, "JSON request body", max_bytes=len(body), max_depth=self.settings.max_json_depth)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


def _content_length(value: bytes | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _with_close(headers: Any) -> list[tuple[bytes, bytes]]:
    kept = [(k, v) for k, v in headers if k.lower() != b"connection"]
    return [*kept, (b"connection", b"close")]


def _is_json(content_type: bytes | None) -> bool:
    """Whether FastAPI would parse this body as JSON: no Content-Type, application/json or */*+json."""
    if content_type is None:
        return True
    mime = content_type.split(b";", 1)[0].strip().lower()
    return mime == b"application/json" or mime.endswith(b"+json")


async def _refuse(send: Send, fault: FlywheelError) -> None:
    """Answer ``fault`` as the app's handler would (its status from fleet.errors) and close the connection."""
    body = json.dumps({"detail": str(fault)}).encode()
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers_for(fault).items()]
    await send({"type": "http.response.start", "status": status_for(fault),
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *extra]})
    await send({"type": "http.response.body", "body": body})


__all__ = ["BodyGuard", "check_json_text", "json_depth", "loads_or_none", "parse_json"]
