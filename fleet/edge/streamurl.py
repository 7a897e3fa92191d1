"""Stream URLs, checked and redacted without PyAV: the agent's config refuses a bad URL before any video
library is imported, and no password reaches a log, a frame or an error."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from fleet.errors import InvalidInput

__all__ = ["STREAM_SCHEMES", "check_stream_url", "redact"]

STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "rtp", "srt", "tcp")


def redact(url: str) -> str:
    """``url`` without its password (``rtsp://user:***@host/path``): safe for logs, frames and errors."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"
    return urlunsplit(parts._replace(netloc=netloc))


def check_stream_url(url: str) -> None:
    """Refuse a stream URL FFmpeg would not read as a network stream, saying which schemes are expected."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise InvalidInput(f"stream URL {redact(url)!r} cannot be parsed: {exc}") from exc
    if parts.scheme.lower() not in STREAM_SCHEMES or not parts.netloc:
        raise InvalidInput(
            f"stream URL must be <scheme>://<host>/... with a scheme in {list(STREAM_SCHEMES)}; "
            f"received {redact(url)!r}")
