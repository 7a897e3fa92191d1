"""PyAV plumbing for the video sources (fleet/edge/video.py): opening errors mapped to the fault tree, decoding
that skips the packets a decoder refuses, a stream's clock, and pixel conversion by FFmpeg's scaler.

Nothing here imports PyAV at module level: the sources pass the ``av`` module in (see :func:`import_av`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fleet.errors import FlywheelError, InvalidInput, NotFound, TransportError, Unauthorized, require

log = logging.getLogger(__name__)

MAX_SIDE = 8192
COMMON_SUFFIXES = ".mp4, .m4v, .mov, .mkv, .webm, .avi"


@dataclass
class SourceStats:
    """Counters of a video source, for logs and tests."""

    decoded: int = 0  # frames the decoder gave
    delivered: int = 0  # frames yielded
    capped: int = 0  # frames dropped by the rate cap
    bad_packets: int = 0  # packets the decoder refused (skipped)
    connects: int = 0  # successful (re)connections of a live source, or files opened
    drops: int = 0  # times a live stream dropped or ended and was reconnected


class Converter:
    """A decoded PyAV frame -> uint8 (h, w, 3) RGB or (h, w) gray, scaled by FFmpeg's scaler when asked."""

    def __init__(self, channels: int, width: int, height: int) -> None:
        if channels not in (1, 3):
            raise InvalidInput(f"channels must be 3 (RGB) or 1 (gray); received {channels!r}")
        for what, v in (("width", width), ("height", height)):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_SIDE:
                raise InvalidInput(f"{what} must be an integer in 0..{MAX_SIDE} (0: the stream's); received {v!r}")
        self.format = "rgb24" if channels == 3 else "gray"
        self.width, self.height = width, height

    def __call__(self, vf: Any) -> NDArray[Any]:
        w, h = self.width, self.height
        if w and not h:
            h = max(1, round(w * vf.height / vf.width))
        elif h and not w:
            w = max(1, round(h * vf.width / vf.height))
        arr: NDArray[Any] = vf.to_ndarray(format=self.format, width=w or None, height=h or None)
        return np.ascontiguousarray(arr)


class StreamClock:
    """Seconds of each decoded frame on its stream's clock, strictly increasing: ``pts * time_base``; a frame
    without a pts, or one that does not advance, is put one nominal frame period after the previous one."""

    def __init__(self, stream: Any) -> None:
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        self.period = float(1 / rate) if rate else 1 / 30
        self.last: float | None = None

    def time(self, vf: Any) -> float:
        t = float(vf.pts * vf.time_base) if vf.pts is not None and vf.time_base is not None else None
        if self.last is not None and (t is None or t <= self.last):
            t = self.last + self.period
        self.last = t if t is not None else 0.0
        return self.last


def import_av() -> Any:
    require("av", "video")
    import av

    return av


def chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    try:
        yield first
        yield from rest
    finally:
        close_decoding(rest, None)


def close_decoding(frames: Iterator[Any], container: Any) -> None:
    """Close the decoding generators before their container: PyAV must not touch a stream after it is closed."""
    close = getattr(frames, "close", None)
    if close is not None:
        close()
    if container is not None:
        container.close()


def ffmpeg_options(options: Mapping[str, Any] | None) -> dict[str, str]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise InvalidInput(f"options must be a table of FFmpeg option names to values; received {options!r:.80}")
    out = {}
    for k, v in options.items():
        if not isinstance(k, str) or not k or isinstance(v, (dict, list, tuple)) or v is None:
            raise InvalidInput(f"FFmpeg option {k!r} must be a name with a string or number value; received {v!r}")
        out[k] = str(v).lower() if isinstance(v, bool) else str(v)
    return out


def video_stream(container: Any, where: str) -> Any:
    if not container.streams.video:
        found = ", ".join(f"{s.type} ({s.codec_context.name if s.codec_context else 'unknown codec'})"
                          for s in container.streams) or "none"
        raise InvalidInput(f"{where}: has no video stream (found: {found}); expected at least one video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise InvalidInput(f"{where}: its video codec is not one this FFmpeg build decodes; expected a common "
                           "codec such as h264, hevc, mpeg4, mjpeg, vp8, vp9 or av1")
    return stream


def decoded(av: Any, container: Any, stream: Any, stats: SourceStats, where: str, *, live: bool) -> Iterator[Any]:
    """Decoded frames of ``stream``; a packet the decoder refuses is skipped and counted (a file's demuxing
    errors are refused as InvalidInput; a live stream's propagate, so the caller reconnects)."""
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.error.FFmpegError as exc:
            if live:
                raise
            raise InvalidInput(f"{where}: cannot be read past frame {stats.decoded}: {strerror(exc)}") from exc
        try:
            decoded = packet.decode()
        except av.error.InvalidDataError as exc:
            stats.bad_packets += 1
            log.debug("%s: skipping a packet the decoder refused: %s", where, strerror(exc))
            continue
        for vf in decoded:
            stats.decoded += 1
            yield vf


def classify(av: Any, exc: Exception, where: str, *, live: bool, camera: bool) -> FlywheelError:
    """The fault tree's error for a failure to open: permanent when retrying cannot help, else retryable."""
    why = strerror(exc)
    if isinstance(exc, (av.error.HTTPUnauthorizedError, av.error.HTTPForbiddenError, av.error.PermissionError)):
        return Unauthorized(f"{where}: access refused ({why}); expected credentials (or device permissions) that "
                            "allow reading it")
    if isinstance(exc, av.error.HTTPNotFoundError) or (isinstance(exc, av.error.FileNotFoundError) and not camera):
        if not live:
            return InvalidInput(f"{where} does not exist")
        return NotFound(f"{where}: no such stream ({why}); expected the address of a stream the server serves")
    if live and isinstance(exc, av.error.HTTPTooManyRequestsError):
        return TransportError(f"{where}: the server is busy ({why})")
    if isinstance(exc, (av.error.ProtocolNotFoundError, av.error.DemuxerNotFoundError,
                        av.error.DecoderNotFoundError, av.error.HTTPClientError)):
        return InvalidInput(f"{where}: cannot be opened ({why}); expected a source this FFmpeg build reads")
    if not live:
        return InvalidInput(f"{where}: cannot be opened as a video ({why}); expected a file FFmpeg can demux "
                            f"and decode, such as {COMMON_SUFFIXES}")
    return TransportError(f"{where}: cannot connect ({why})")


def strerror(exc: BaseException) -> str:
    """The reason without the file name FFmpeg appends (a URL may hold credentials)."""
    return str(getattr(exc, "strerror", None) or type(exc).__name__)


def creation_time(metadata: Mapping[str, str]) -> float | None:
    """A file's ``creation_time`` metadata as unix seconds, or None when absent or unparseable."""
    raw = metadata.get("creation_time") if metadata else None
    if not raw:
        return None
    try:
        dt = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        return None
    stamp = dt.timestamp()
    return stamp if stamp > 0 else None
