"""Video and camera sources through PyAV (FFmpeg): a video file or a folder of them, an RTSP/HTTP stream, a camera.

PyAV is the ``video`` extra and loads only when a video source is built, so the rest of the agent runs
without it. Each source yields :class:`~fleet.edge.sources.Frame` objects with uint8 HxWx3 RGB pixels (HxW
gray with ``channels=1``), the stream they came from (``stream``), their decode order in it (``index``,
counting the frames the rate cap dropped, so a gap says frames were skipped) and its clock:

- ``stream_time``: seconds on the stream's clock, ``pts * time_base`` as encoded, strictly increasing within a
  stream. A looped file's later passes go on from where the previous pass ended; a live stream counts from its
  first frame, and a reconnect goes on from the wall-clock time since then.
- ``ts``: capture time, unix seconds. Live: the wall clock when the connection was opened plus the stream time
  since its first frame, never later than the frame arrived (a server that sends faster than real time, or
  from a cache, gets arrival times), strictly increasing across reconnects. A file: its ``creation_time``
  metadata plus the stream time, or None (the agent then stamps the frame when it sees it).

The rate cap (``max_fps``) drops frames to stay at or below N per second: by stream time for files (the same
frames whatever the machine's speed), by the wall clock on arrival for live sources. A file that ends just ends
(or starts again with ``loop``); a live source that drops or ends reconnects under the shared
:class:`~fleet.retry.RetryPolicy` (jittered exponential backoff, tenacity) and gives up after its deadline with
a :class:`~fleet.errors.TransportError`. What cannot work by retrying (no such file or stream, refused
credentials, no video stream, a codec FFmpeg cannot decode) is refused at once with a
:class:`~fleet.errors.PermanentError` saying what was received and what was expected. Credentials in a URL are
never logged nor put in a frame or an error.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from numpy.typing import NDArray

from fleet.edge.sources import Frame
from fleet.errors import (
    FlywheelError,
    InvalidInput,
    NotFound,
    RetryableError,
    TransportError,
    Unauthorized,
    require,
)
from fleet.retry import RetryPolicy

if TYPE_CHECKING:
    from fleet.edge.config import SourceConfig

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".mts", ".m2ts", ".mpg", ".mpeg", ".flv",
                  ".wmv", ".ogv", ".3gp", ".h264", ".264", ".h265", ".hevc", ".ivf", ".y4m", ".mjpeg")
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "rtp", "srt", "tcp")
LIVE_DEFAULTS = {"rtsp": {"rtsp_transport": "tcp"}, "rtsps": {"rtsp_transport": "tcp"}}  # no UDP loss, one socket
MAX_SIDE = 8192
_EPS = 1e-6  # seconds: two clock readings closer than this are the same instant


def camera_format() -> str:
    """FFmpeg's capture-device format on this platform (v4l2 on Linux)."""
    if sys.platform == "darwin":
        return "avfoundation"
    if sys.platform == "win32":
        return "dshow"
    return "v4l2"


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


class RateCap:
    """Keeps at most ``fps`` frames a second of a clock and drops the rest (``fps`` 0: keeps every frame).

    Kept frames follow a grid of period ``1/fps`` starting at the first frame, so any span of ``w`` seconds
    holds at most ``fps * w + 1`` of them, and a 30 fps stream capped at 12 keeps 2 frames in 5. After a gap
    longer than a period (a stall, a reconnect) the grid restarts at the next frame instead of letting a burst
    through.
    """

    def __init__(self, fps: float) -> None:
        if not fps >= 0 or math.isinf(fps):
            raise InvalidInput(f"max_fps must be a finite number >= 0 (0: no cap); received {fps!r}")
        self.period = 1.0 / fps if fps else 0.0
        self._due: float | None = None

    def keep(self, t: float) -> bool:
        """Whether the frame at time ``t`` (seconds, non-decreasing between calls) is kept."""
        if not self.period:
            return True
        if self._due is not None and t < self._due - _EPS:
            return False
        due = t if self._due is None else self._due
        self._due = due + self.period if due + self.period > t + _EPS else t + self.period
        return True


@dataclass
class SourceStats:
    """Counters of a video source, for logs and tests."""

    decoded: int = 0  # frames the decoder gave
    delivered: int = 0  # frames yielded
    capped: int = 0  # frames dropped by the rate cap
    bad_packets: int = 0  # packets the decoder refused (skipped)
    connects: int = 0  # successful (re)connections of a live source, or files opened
    drops: int = 0  # times a live stream dropped or ended and was reconnected


class VideoFileSource:
    """The frames of a video file, or of every video file in a folder (sorted by name, each its own stream).

    ``path``: a file FFmpeg can demux (any name), or a folder of files named ``*{VIDEO_SUFFIXES}``.
    ``max_fps``: cap by stream time (0: every frame); ``channels``: 3 (RGB) or 1 (gray); ``width``/``height``:
    scale frames with FFmpeg's scaler (0: the stream's size; one of them alone keeps the aspect ratio);
    ``options``: FFmpeg demuxer options.
    """

    def __init__(self, path: str | Path, *, loop: bool = False, max_fps: float = 0.0, channels: int = 3,
                 width: int = 0, height: int = 0, options: Mapping[str, str] | None = None) -> None:
        self.av = _import_av()
        self.path = Path(path)
        if self.path.is_dir():
            self.files = sorted(p for p in self.path.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
            if not self.files:
                raise InvalidInput(f"video folder {self.path} holds no {'/'.join(VIDEO_SUFFIXES)} files")
        elif self.path.is_file():
            self.files = [self.path]
        else:
            raise InvalidInput(f"video file or folder {self.path} does not exist")
        self.loop = loop
        self.max_fps = max_fps
        self.convert = _Converter(channels, width, height)
        RateCap(max_fps)  # validates
        self.options = _options(options)
        self.stats = SourceStats()

    def __iter__(self) -> Iterator[Frame]:
        progress = {p: _Progress(cap=RateCap(self.max_fps)) for p in self.files}  # each file is its own stream
        while True:
            for p in self.files:
                yield from self._file(p, progress[p])
            if not self.loop:
                return

    def _file(self, path: Path, progress: _Progress) -> Iterator[Frame]:
        av = self.av
        where = f"video file {path}"
        try:
            container = av.open(str(path), options=dict(self.options))
        except av.error.FFmpegError as exc:
            raise _classify(av, exc, where, live=False, camera=False) from exc
        frames: Iterator[Any] = iter(())
        first = last = None
        bad_before = self.stats.bad_packets
        try:
            stream = _video_stream(container, where)
            clock = _StreamClock(stream)
            wall0 = _creation_time(container.metadata)
            self.stats.connects += 1
            frames = _decoded(av, container, stream, self.stats, where, live=False)
            for vf in frames:
                t = clock.time(vf)
                first = t if first is None else first
                last = t
                st = progress.offset + t
                i = progress.index
                progress.index += 1
                if not progress.cap.keep(st):
                    self.stats.capped += 1
                    continue
                self.stats.delivered += 1
                yield Frame(image=self.convert(vf), frame_id=f"{path.name}:{i}",
                            ts=wall0 + (t - first) if wall0 is not None else None,
                            stream=str(path), index=i, stream_time=st)
        finally:
            _close(frames, container)
        if first is None or last is None:
            raise InvalidInput(f"{where}: holds no decodable video frame; expected at least one")
        progress.offset += last - first + clock.period  # a second pass goes on after the first one
        if self.stats.bad_packets > bad_before:
            log.warning("%s: skipped %d packet(s) the decoder refused", where, self.stats.bad_packets - bad_before)


class LiveSource:
    """Frames from an RTSP/HTTP stream (``kind="stream"``) or a camera (``kind="camera"``), as they arrive.

    ``target``: the URL, or the device (``/dev/video0``) read with ``format`` (camera: :func:`camera_format`).
    ``options``: FFmpeg options (v4l2: ``video_size``, ``framerate``, ``input_format``; RTSP: ``rtsp_transport``,
    TCP unless set). ``retry``: how to reconnect; ``open_timeout_s``/``read_timeout_s``: how long a connection
    or a read may wait before it counts as dropped. ``stop()`` (any thread) ends the iteration at the next frame
    or retry wait.
    """

    def __init__(self, target: str, *, kind: str = "stream", format: str = "", options: Mapping[str, str] | None = None,
                 max_fps: float = 0.0, channels: int = 3, width: int = 0, height: int = 0,
                 open_timeout_s: float = 10.0, read_timeout_s: float = 10.0, retry: RetryPolicy | None = None,
                 wall_clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        if kind not in ("stream", "camera"):
            raise InvalidInput(f"live source kind must be 'stream' or 'camera'; received {kind!r}")
        self.av = _import_av()
        self.kind = kind
        self.target = target
        if kind == "stream":
            check_stream_url(target)
            self.name = redact(target)
            scheme = urlsplit(target).scheme.lower()
            self.options = {**LIVE_DEFAULTS.get(scheme, {}), **_options(options)}
            self.format = format or None
        else:
            if not target:
                raise InvalidInput("camera device must be a non-empty string such as /dev/video0; received ''")
            self.name = f"camera:{target}"
            self.options = _options(options)
            self.format = format or camera_format()
        for what, v in (("open_timeout_s", open_timeout_s), ("read_timeout_s", read_timeout_s)):
            if not 0 < v < math.inf:
                raise InvalidInput(f"{what} must be a number of seconds > 0; received {v!r}")
        self.timeout = (float(open_timeout_s), float(read_timeout_s))
        self.max_fps = max_fps
        RateCap(max_fps)  # validates
        self.convert = _Converter(channels, width, height)
        self.retry = retry or RetryPolicy(attempts=sys.maxsize, base_s=0.5, cap_s=8.0, deadline_s=300.0)
        self.wall_clock, self.monotonic = wall_clock, monotonic
        self.stats = SourceStats()
        self._stop = threading.Event()

    def stop(self) -> None:
        """End the iteration at the next frame, or at once while waiting to reconnect."""
        self._stop.set()

    def __iter__(self) -> Iterator[Frame]:
        av = self.av
        cap = RateCap(self.max_fps)
        index = 0
        first_open: float | None = None  # monotonic time the source first connected
        last_st = last_ts = -math.inf
        while not self._stop.is_set():
            connected = self._connect()
            if connected is None:
                return
            container, stream, frames, wall_open, mono_open = connected
            clock = _StreamClock(stream)
            first_open = mono_open if first_open is None else first_open
            # a new connection goes on after the last one, on both clocks
            offset = max(mono_open - first_open, last_st + clock.period) if index else 0.0
            t0: float | None = None
            try:
                for vf in frames:
                    now = self.monotonic()
                    t = clock.time(vf)
                    t0 = t if t0 is None else t0
                    st = offset + (t - t0)
                    # captured no earlier than the connection was opened, and no later than it arrived
                    ts = max(min(wall_open + (t - t0), self.wall_clock()), last_ts + _EPS)
                    last_st, last_ts = st, ts
                    i = index
                    index += 1
                    if not cap.keep(now):
                        self.stats.capped += 1
                        continue
                    self.stats.delivered += 1
                    yield Frame(image=self.convert(vf), frame_id=f"{self.name}:{i}", ts=ts,
                                stream=self.name, index=i, stream_time=st)
                    if self._stop.is_set():
                        return
                reason = "the stream ended"
            except (av.error.FFmpegError, OSError) as exc:
                reason = f"the stream dropped ({_strerror(exc)})"
            finally:
                _close(frames, container)
            if self._stop.is_set():
                return
            self.stats.drops += 1
            log.warning("%s: %s after %d frame(s); reconnecting", self.name, reason, index)

    def _wait(self, seconds: float) -> None:
        """The retry policy's sleep: cut short by stop()."""
        self._stop.wait(seconds)

    def _connect(self) -> tuple[Any, Any, Iterator[Any], float, float] | None:
        """Open the stream and decode its first frame, retrying under the policy; None once stopped. Returns
        the container, its video stream, its frames, and the wall and monotonic times the open began."""
        t0 = self.monotonic()
        tries = 0

        def attempt() -> tuple[Any, Any, Iterator[Any], float, float]:
            nonlocal tries
            if self._stop.is_set():
                raise _Stopped
            tries += 1
            return self._open_once()

        try:
            out = self.retry.call(f"opening {self.name}", attempt, sleep=self._wait)
        except _Stopped:
            return None
        except RetryableError as exc:
            raise TransportError(
                f"{self.name}: gave up after {tries} failed connection attempt(s) over "
                f"{self.monotonic() - t0:.1f} s (the retry policy's limit); last error: {exc}") from exc
        self.stats.connects += 1
        if self.stats.connects > 1:
            log.info("%s: reconnected after %.1f s", self.name, self.monotonic() - t0)
        return out

    def _open_once(self) -> tuple[Any, Any, Iterator[Any], float, float]:
        av = self.av
        camera = self.kind == "camera"
        wall, mono = self.wall_clock(), self.monotonic()
        try:
            container = av.open(self.target, format=self.format, options=dict(self.options), timeout=self.timeout)
        except av.error.FFmpegError as exc:
            raise _classify(av, exc, self.name, live=True, camera=camera) from exc
        frames: Iterator[Any] = iter(())
        try:
            stream = _video_stream(container, self.name)
            frames = _decoded(av, container, stream, self.stats, self.name, live=True)
            first = next(frames)
        except StopIteration:
            _close(frames, container)
            raise TransportError(f"{self.name}: connected, but the stream ended before its first frame") from None
        except av.error.FFmpegError as exc:
            _close(frames, container)
            raise _classify(av, exc, self.name, live=True, camera=camera) from exc
        except BaseException:
            _close(frames, container)
            raise
        return container, stream, _chain(first, frames), wall, mono


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


def open_video(cfg: SourceConfig) -> VideoFileSource | LiveSource:
    """The video source an agent config's ``[source]`` section describes (kind video, stream or camera)."""
    common: dict[str, Any] = dict(max_fps=cfg.max_fps, channels=cfg.channels, width=cfg.width, height=cfg.height,
                                  options=dict(cfg.options))
    if cfg.kind == "video":
        if cfg.path is None:
            raise InvalidInput("source.path must name a video file or folder for kind 'video'")
        return VideoFileSource(cfg.path, loop=cfg.loop, **common)
    if cfg.kind not in ("stream", "camera"):
        raise InvalidInput(f"not a video source kind: {cfg.kind!r}; expected 'video', 'stream' or 'camera'")
    retry = RetryPolicy(attempts=sys.maxsize, base_s=cfg.reconnect_base_s, cap_s=cfg.reconnect_max_s,
                        deadline_s=cfg.reconnect_deadline_s or math.inf)
    return LiveSource(cfg.url if cfg.kind == "stream" else cfg.device, kind=cfg.kind, format=cfg.format,
                      open_timeout_s=cfg.open_timeout_s, read_timeout_s=cfg.read_timeout_s, retry=retry, **common)


# ---------------------------------------------------------------------------------------------


class _Stopped(Exception):
    """Raised inside a retry when the source was stopped (not a FlywheelError: never retried)."""


@dataclass
class _Progress:
    cap: RateCap  # the stream's rate cap, kept across the passes of a looped file
    index: int = 0  # frames decoded so far in this stream (every pass of a looped file)
    offset: float = 0.0  # added to the stream time of the current pass


class _Converter:
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


class _StreamClock:
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


def _import_av() -> Any:
    require("av", "video")
    import av

    return av


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    try:
        yield first
        yield from rest
    finally:
        _close(rest, None)


def _close(frames: Iterator[Any], container: Any) -> None:
    """Close the decoding generators before their container: PyAV must not touch a stream after it is closed."""
    close = getattr(frames, "close", None)
    if close is not None:
        close()
    if container is not None:
        container.close()


def _options(options: Mapping[str, Any] | None) -> dict[str, str]:
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


def _video_stream(container: Any, where: str) -> Any:
    if not container.streams.video:
        found = ", ".join(f"{s.type} ({s.codec_context.name if s.codec_context else 'unknown codec'})"
                          for s in container.streams) or "none"
        raise InvalidInput(f"{where}: has no video stream (found: {found}); expected at least one video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise InvalidInput(f"{where}: its video codec is not one this FFmpeg build decodes; expected a common "
                           "codec such as h264, hevc, mpeg4, mjpeg, vp8, vp9 or av1")
    return stream


def _decoded(av: Any, container: Any, stream: Any, stats: SourceStats, where: str, *, live: bool) -> Iterator[Any]:
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
            raise InvalidInput(f"{where}: cannot be read past frame {stats.decoded}: {_strerror(exc)}") from exc
        try:
            decoded = packet.decode()
        except av.error.InvalidDataError as exc:
            stats.bad_packets += 1
            log.debug("%s: skipping a packet the decoder refused: %s", where, _strerror(exc))
            continue
        for vf in decoded:
            stats.decoded += 1
            yield vf


def _classify(av: Any, exc: Exception, where: str, *, live: bool, camera: bool) -> FlywheelError:
    """The fault tree's error for a failure to open: permanent when retrying cannot help, else retryable."""
    why = _strerror(exc)
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
                            f"and decode, such as {', '.join(VIDEO_SUFFIXES[:6])}")
    return TransportError(f"{where}: cannot connect ({why})")


def _strerror(exc: BaseException) -> str:
    """The reason without the file name FFmpeg appends (a URL may hold credentials)."""
    return str(getattr(exc, "strerror", None) or type(exc).__name__)


def _creation_time(metadata: Mapping[str, str]) -> float | None:
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
