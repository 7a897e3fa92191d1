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
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fleet.edge.avio import (
    Converter,
    SourceStats,
    StreamClock,
    chain,
    classify,
    close_decoding,
    creation_time,
    decoded,
    ffmpeg_options,
    import_av,
    strerror,
    video_stream,
)
from fleet.edge.frame import Frame
from fleet.edge.streamurl import check_stream_url, redact
from fleet.errors import InvalidInput, RetryableError, TransportError
from fleet.retry import RetryPolicy

if TYPE_CHECKING:
    from fleet.edge.config import SourceConfig

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".mts", ".m2ts", ".mpg", ".mpeg", ".flv",
                  ".wmv", ".ogv", ".3gp", ".h264", ".264", ".h265", ".hevc", ".ivf", ".y4m", ".mjpeg")
LIVE_DEFAULTS = {"rtsp": {"rtsp_transport": "tcp"}, "rtsps": {"rtsp_transport": "tcp"}}  # no UDP loss, one socket
_EPS = 1e-6  # seconds: two clock readings closer than this are the same instant


def camera_format() -> str:
    """FFmpeg's capture-device format on this platform (v4l2 on Linux)."""
    if sys.platform == "darwin":
        return "avfoundation"
    if sys.platform == "win32":
        return "dshow"
    return "v4l2"


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


class VideoFileSource:
    """The frames of a video file, or of every video file in a folder (sorted by name, each its own stream).

    ``path``: a file FFmpeg can demux (any name), or a folder of files named ``*{VIDEO_SUFFIXES}``.
    ``max_fps``: cap by stream time (0: every frame); ``channels``: 3 (RGB) or 1 (gray); ``width``/``height``:
    scale frames with FFmpeg's scaler (0: the stream's size; one of them alone keeps the aspect ratio);
    ``options``: FFmpeg demuxer options.
    """

    def __init__(self, path: str | Path, *, loop: bool = False, max_fps: float = 0.0, channels: int = 3,
                 width: int = 0, height: int = 0, options: Mapping[str, str] | None = None) -> None:
        self.av = import_av()
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
        self.convert = Converter(channels, width, height)
        RateCap(max_fps)  # validates
        self.options = ffmpeg_options(options)
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
            raise classify(av, exc, where, live=False, camera=False) from exc
        frames: Iterator[Any] = iter(())
        first = last = None
        bad_before = self.stats.bad_packets
        try:
            stream = video_stream(container, where)
            clock = StreamClock(stream)
            wall0 = creation_time(container.metadata)
            self.stats.connects += 1
            frames = decoded(av, container, stream, self.stats, where, live=False)
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
            close_decoding(frames, container)
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
        self.av = import_av()
        self.kind = kind
        self.target = target
        if kind == "stream":
            check_stream_url(target)
            self.name = redact(target)
            scheme = urlsplit(target).scheme.lower()
            self.options = {**LIVE_DEFAULTS.get(scheme, {}), **ffmpeg_options(options)}
            self.format = format or None
        else:
            if not target:
                raise InvalidInput("camera device must be a non-empty string such as /dev/video0; received ''")
            self.name = f"camera:{target}"
            self.options = ffmpeg_options(options)
            self.format = format or camera_format()
        for what, v in (("open_timeout_s", open_timeout_s), ("read_timeout_s", read_timeout_s)):
            if not 0 < v < math.inf:
                raise InvalidInput(f"{what} must be a number of seconds > 0; received {v!r}")
        self.timeout = (float(open_timeout_s), float(read_timeout_s))
        self.max_fps = max_fps
        RateCap(max_fps)  # validates
        self.convert = Converter(channels, width, height)
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
            clock = StreamClock(stream)
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
                reason = f"the stream dropped ({strerror(exc)})"
            finally:
                close_decoding(frames, container)
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
            raise classify(av, exc, self.name, live=True, camera=camera) from exc
        frames: Iterator[Any] = iter(())
        try:
            stream = video_stream(container, self.name)
            frames = decoded(av, container, stream, self.stats, self.name, live=True)
            first = next(frames)
        except StopIteration:
            close_decoding(frames, container)
            raise TransportError(f"{self.name}: connected, but the stream ended before its first frame") from None
        except av.error.FFmpegError as exc:
            close_decoding(frames, container)
            raise classify(av, exc, self.name, live=True, camera=camera) from exc
        except BaseException:
            close_decoding(frames, container)
            raise
        return container, stream, chain(first, frames), wall, mono


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
