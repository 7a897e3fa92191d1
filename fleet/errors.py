"""One exception tree for the fleet, split into retryable and permanent faults (httpx's pattern), and the
one mapping between HTTP statuses and that tree, used by every client and by the hub itself.

======================================  ======================  ==========================================
fault                                   raised by a client for  the hub answers it with
======================================  ======================  ==========================================
:class:`TooManyRequests` (retryable)    429                     429, with ``Retry-After``
:class:`RequestTimeout` (retryable)     408                     408 (a request body sent too slowly)
:class:`ServerBusy` (retryable)         425, 5xx                503 (with ``Retry-After`` when known)
:class:`TransportError` (retryable)     no answer at all        (not an answer)
:class:`Unauthorized`                   401, 403                401 (403 with ``Forbidden``)
:class:`NotFound`                       404                     404
:class:`Conflict`                       409                     409
:class:`PayloadTooLarge`                413                     413
:class:`UnsupportedMedia`               415                     415
:class:`InvalidInput`                   400, 422, other 4xx     400
:class:`ProtocolError`                  (a malformed answer)    422
:class:`IntegrityError`                 (bytes that do not      422
                                        verify)
======================================  ======================  ==========================================
"""

from __future__ import annotations

import email.utils
import math
import time
from pathlib import Path
from typing import Any, Protocol

__all__ = ["Conflict", "FlywheelError", "Forbidden", "IntegrityError", "InvalidInput", "MissingExtra", "NotFound",
    "PayloadTooLarge", "PermanentError", "ProtocolError", "RETRYABLE_STATUS", "RequestTimeout", "RetryableError",
    "ServerBusy", "TooManyRequests", "TransportError", "Unauthorized", "UnsupportedMedia", "check_folder",
    "error_for_response", "error_for_status", "headers_for", "parse_retry_after", "require", "response_detail",
    "status_for"]


class FlywheelError(Exception):
    """Base of every error Flywheel raises on purpose."""


class RetryableError(FlywheelError):
    """A fault that may go away by itself: a network hiccup, a 5xx, a 429. Clients retry these."""


class PermanentError(FlywheelError):
    """A fault that retrying cannot fix: bad input, refused credentials, a bad signature."""


class TransportError(RetryableError):
    """The peer could not be reached or the connection broke."""


class ServerBusy(RetryableError):
    """The peer answered 408, 425, 429 or 5xx. ``retry_after``: seconds the peer asked to wait, if it said."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooManyRequests(ServerBusy):
    """Over a rate or a quota (HTTP 429): wait ``retry_after`` seconds, then try again."""


class RequestTimeout(ServerBusy):
    """The request (its body) did not arrive in time (HTTP 408); sending it again may work."""


class InvalidInput(PermanentError, ValueError):
    """Input that does not match what was expected; the message says what was received and expected."""


class PayloadTooLarge(InvalidInput):
    """A body, part or file over its size limit (HTTP 413)."""


class UnsupportedMedia(InvalidInput):
    """Bytes of the wrong kind (HTTP 415): not a PNG, not an ONNX file."""


class Unauthorized(PermanentError):
    """Missing, unknown, revoked or out-of-scope credentials."""


class Forbidden(Unauthorized):
    """Valid credentials that may not do this (HTTP 403): another device's case, a scope that does not reach."""


class NotFound(PermanentError):
    """The object asked for does not exist (HTTP 404)."""


class Conflict(PermanentError):
    """The request contradicts the peer's state (HTTP 409): an id reused with other content, a state change
    that is no longer possible."""


class IntegrityError(PermanentError):
    """Bytes whose hash or signature does not verify."""


class ProtocolError(PermanentError, ValueError):
    """A message that does not follow the wire contract in fleet.protocol."""


class MissingExtra(FlywheelError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def require(module: str, extra: str) -> None:
    """Import ``module`` or fail with a message naming ``pip install 'edge-flywheel[extra]'``."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised by the boundary tests
        raise MissingExtra(
            f"{module!r} is not installed; install it with: pip install 'edge-flywheel[{extra}]'"
        ) from exc


def check_folder(path: Path, what: str, purpose: str) -> None:
    """InvalidInput when ``path`` cannot be a folder because it, or a folder above it, is a file: checked before a
    long job (a training run, an agent's start) that would write there only at its end."""
    on_disk = next(p for p in (path, *path.absolute().parents) if p.exists())  # the root always exists
    if not on_disk.is_dir():
        raise InvalidInput(f"{what} {path} cannot be a folder: {on_disk} is a file; expected a folder (or one that "
                           f"can be made) for {purpose}")


# ---------------------------------------------------------------------------------------------
# HTTP statuses <-> the tree
# ---------------------------------------------------------------------------------------------

RETRYABLE_STATUS = frozenset({408, 425, 429})

_BY_STATUS: dict[int, type[FlywheelError]] = {
    401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 413: PayloadTooLarge, 415: UnsupportedMedia,
}

# most specific first: the first class an error is an instance of gives its status
_STATUS_OF: tuple[tuple[type[FlywheelError], int], ...] = (
    (Forbidden, 403), (Unauthorized, 401), (NotFound, 404), (Conflict, 409), (PayloadTooLarge, 413),
    (UnsupportedMedia, 415), (InvalidInput, 400), (ProtocolError, 422), (IntegrityError, 422),
    (TooManyRequests, 429), (RequestTimeout, 408), (RetryableError, 503), (PermanentError, 400), (FlywheelError, 500),
)


def error_for_status(status: int, what: str, *, retry_after: float | None = None) -> FlywheelError:
    """The fault an answer with HTTP ``status`` is: retryable (408, 425, 429, 5xx) or one permanent kind.

    ``what`` is the whole message (say which call, the status and the peer's detail)."""
    if status == 429:
        return TooManyRequests(what, retry_after=retry_after)
    if status == 408:
        return RequestTimeout(what, retry_after=retry_after)
    if status >= 500 or status in RETRYABLE_STATUS:
        return ServerBusy(what, retry_after=retry_after)
    return _BY_STATUS.get(status, InvalidInput)(what)


def status_for(exc: FlywheelError) -> int:
    """The HTTP status the hub answers a fault with (the inverse of :func:`error_for_status`)."""
    return next(code for kind, code in _STATUS_OF if isinstance(exc, kind))


def headers_for(exc: FlywheelError) -> dict[str, str]:
    """What the hub's answer to ``exc`` says besides its status: when to retry (``Retry-After``, whole
    seconds, at least 1) and, for a 401, how to authenticate (``WWW-Authenticate``, RFC 9110)."""
    after = getattr(exc, "retry_after", None)
    if after is not None:
        return {"Retry-After": str(max(1, math.ceil(after)))}
    if isinstance(exc, Unauthorized) and not isinstance(exc, Forbidden):
        return {"WWW-Authenticate": "Bearer"}
    return {}


class _Response(Protocol):  # what error_for_response reads of an httpx.Response (no httpx import here)
    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Any: ...

    @property
    def text(self) -> str: ...

    def json(self) -> Any: ...


def error_for_response(resp: _Response, what: str) -> FlywheelError | None:
    """None for a success (< 400); otherwise :func:`error_for_status` of it, with the peer's ``detail`` and its
    ``Retry-After`` (seconds or an HTTP date)."""
    code = int(resp.status_code)
    if code < 400:
        return None
    retry_after = parse_retry_after(resp.headers.get("retry-after"))
    return error_for_status(code, f"{what}: HTTP {code}: {response_detail(resp)}", retry_after=retry_after)


def response_detail(resp: _Response, *, limit: int = 500) -> str:
    """The peer's ``detail`` (FastAPI's and Label Studio's error field), else the start of the body."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:limit]
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        extra = body.get("validation_errors")  # Label Studio's reason behind "Validation error"
        text = str(detail) if extra is None else f"{detail} {extra}"
        return text[:limit]
    return str(body)[:limit]


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` in seconds: a delay (``"120"``) or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)
