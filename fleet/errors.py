"""One exception tree for the fleet, split into retryable and permanent faults (httpx's pattern)."""

from __future__ import annotations


class FlywheelError(Exception):
    """Base of every error Flywheel raises on purpose."""


class RetryableError(FlywheelError):
    """A fault that may go away by itself: a network hiccup, a 5xx, a 429. The uplink retries these."""


class PermanentError(FlywheelError):
    """A fault that retrying cannot fix: bad input, refused credentials, a bad signature."""


class TransportError(RetryableError):
    """The peer could not be reached or the connection broke."""


class ServerBusy(RetryableError):
    """The peer answered 5xx or 429."""


class InvalidInput(PermanentError, ValueError):
    """Input that does not match what was expected; the message says what was received and expected."""


class Unauthorized(PermanentError):
    """Missing, unknown, revoked or out-of-scope credentials."""


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
