"""The agent's typed configuration: frozen dataclasses read from a TOML file, validated once.

Example (every key but ``device_id``, ``hub.url`` and ``source`` has a default)::

    device_id = "cam-0001"
    data_dir = "/var/lib/flywheel"      # relative paths are relative to this file

    [hub]
    url = "http://hub.local:8000"
    group = "default"
    fleet_secret = "..."                # enrollment only; or FLYWHEEL_FLEET_SECRET
    fleet_public_key = ""               # optional: refuse to enroll with a hub that offers another key

    [runtime]
    threads = 1                         # onnxruntime intra-op threads
    inference = "auto"                  # process: the models in a process of their own; thread: in the agent's;
                                        # auto: process when the agent may use 2 or more cores, else thread
    batch_size = 1                      # frames per inference call
    trigger_window = 64                 # frames per trigger decision (amortises its cost; no effect on scores)
    trigger_max_delay_s = 1.0           # decide sooner once the oldest frame has waited this long

    [source]
    kind = "replay"                     # npz | folder | replay | video | stream | camera
    path = "frames/replay.jsonl"        # npz, folder, replay; video: a video file or a folder of them
    loop = false                        # file kinds: start again at the end
    fps = 0                             # file kinds: pace frames at this rate, like a camera (0: as fast as they come)
    # video, stream and camera (the `video` extra, PyAV; see fleet/edge/video.py):
    # url = "rtsp://user:pass@cam.local/stream1"   # stream: rtsp(s), http(s), rtmp(s), udp, rtp, srt, tcp
    # device = "/dev/video0"            # camera, read with `format` (v4l2 on Linux when empty)
    # format = ""                       # FFmpeg input format, when it cannot be guessed
    # options = { video_size = "1280x720", framerate = "30", input_format = "mjpeg" }   # FFmpeg options
    # max_fps = 0                       # drop frames above this rate (files: stream time; live: wall clock)
    # channels = 3                      # 3: RGB, 1: gray (decoded straight to gray: for 1-channel models)
    # width = 0                         # scale frames with FFmpeg (0: as decoded; one alone keeps the aspect)
    # height = 0
    # open_timeout_s = 10               # stream and camera: a connection or a read that waits longer drops
    # read_timeout_s = 10
    # reconnect_base_s = 0.5            # then reconnect with jittered exponential backoff (fleet/retry.py)
    # reconnect_max_s = 8
    # reconnect_deadline_s = 300        # give up after this long without a connection (0: never)

    [spool]
    max_bytes = 67108864

    [uplink]
    bytes_per_minute = 0                # 0: no limit
    backoff_base_s = 0.5
    backoff_max_s = 60
    drain_timeout_s = 5                 # on exit, wait this long for the spool to empty
    batch_max_cases = 16                # cases per upload request (1: one case per request)
    batch_max_bytes = 4194304           # bytes per upload request (one case larger than this goes alone)
    linger_s = 0.5                      # a batch not yet full waits this long for more cases (0: send at once)

    [heartbeat]
    interval_s = 30

    [ota]
    poll_interval_s = 60
    health_frames = 8
    sync_at_start = false               # poll the hub once, and follow its assignment, before the first frame

    [triggers]
    default_spec = ""                   # optional trigger spec JSON used while no campaign is assigned
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from fleet.edge.streamurl import check_stream_url
from fleet.errors import InvalidInput, check_folder
from fleet.protocol import NAME_RE

INFERENCE_MODES = ("auto", "process", "thread")  # runtime.inference: where the models run (fleet/edge/inference.py)

FLEET_SECRET_ENV = "FLYWHEEL_FLEET_SECRET"
FILE_KINDS = ("npz", "folder", "replay", "video")
LIVE_KINDS = ("stream", "camera")
SOURCE_KINDS = (*FILE_KINDS, *LIVE_KINDS)
VIDEO_KINDS = ("video", *LIVE_KINDS)


@dataclass(frozen=True)
class HubConfig:
    url: str
    group: str = "default"
    fleet_secret: str = ""
    fleet_public_key: str = ""
    timeout_s: float = 10.0


@dataclass(frozen=True)
class RuntimeConfig:
    threads: int = 1
    batch_size: int = 1
    trigger_window: int = 64  # frames decided together by the trigger spec
    trigger_max_delay_s: float = 1.0  # ... or fewer, once the oldest has waited this long
    inference: str = "auto"  # where the models run: "process", "thread" or "auto" (fleet/edge/inference.py)


@dataclass(frozen=True)
class SourceConfig:
    kind: str
    path: Path | None = None  # file kinds
    loop: bool = False
    fps: float = 0.0  # file kinds: pace
    url: str = ""  # stream
    device: str = ""  # camera
    format: str = ""  # stream, camera: FFmpeg input format
    options: tuple[tuple[str, str], ...] = ()  # video kinds: FFmpeg options, as (name, value) pairs
    max_fps: float = 0.0  # video kinds: drop frames above this rate
    channels: int = 3
    width: int = 0
    height: int = 0
    open_timeout_s: float = 10.0
    read_timeout_s: float = 10.0
    reconnect_base_s: float = 0.5
    reconnect_max_s: float = 8.0
    reconnect_deadline_s: float = 300.0  # 0: never give up

    @property
    def target(self) -> str:
        """What the source reads: the path, the URL or the device."""
        return self.url if self.kind == "stream" else self.device if self.kind == "camera" else str(self.path)


# the [source] keys that apply to some kinds only (the rest apply to all)
SOURCE_KEYS_FOR: dict[str, tuple[str, ...]] = {
    "path": FILE_KINDS, "loop": FILE_KINDS, "fps": FILE_KINDS, "url": ("stream",), "device": ("camera",),
    "format": VIDEO_KINDS, "options": VIDEO_KINDS, "max_fps": VIDEO_KINDS, "channels": VIDEO_KINDS,
    "width": VIDEO_KINDS, "height": VIDEO_KINDS, "open_timeout_s": LIVE_KINDS, "read_timeout_s": LIVE_KINDS,
    "reconnect_base_s": LIVE_KINDS, "reconnect_max_s": LIVE_KINDS, "reconnect_deadline_s": LIVE_KINDS,
}


@dataclass(frozen=True)
class SpoolConfig:
    max_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class UplinkConfig:
    bytes_per_minute: int = 0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 60.0
    drain_timeout_s: float = 5.0  # on exit, wait this long for the spool to empty
    batch_max_cases: int = 16  # cases per upload request to the hub's batch endpoint (1: single uploads)
    batch_max_bytes: int = 4 * 1024 * 1024  # bytes per upload request (a larger case goes alone)
    linger_s: float = 0.5  # a batch not yet full waits this long for more cases (0: send at once)


@dataclass(frozen=True)
class HeartbeatConfig:
    interval_s: float = 30.0


@dataclass(frozen=True)
class OtaConfig:
    poll_interval_s: float = 60.0
    health_frames: int = 8
    # true: the agent polls the hub once, and follows what it assigns (a new model, a campaign version), before it
    # runs the first frame, so no frame goes through a model the hub has already replaced; a poll that fails leaves
    # the stored models, and mining starts with them (the control thread goes on polling)
    sync_at_start: bool = False


@dataclass(frozen=True)
class TriggersConfig:
    default_spec: Path | None = None


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    data_dir: Path
    hub: HubConfig
    source: SourceConfig
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    uplink: UplinkConfig = field(default_factory=UplinkConfig)
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    ota: OtaConfig = field(default_factory=OtaConfig)
    triggers: TriggersConfig = field(default_factory=TriggersConfig)

    @property
    def fleet_secret(self) -> str:
        return self.hub.fleet_secret or os.environ.get(FLEET_SECRET_ENV, "")


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate an agent TOML file; raise InvalidInput naming the key and the value received."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"cannot read agent config {path}: {exc.strerror or exc}") from exc
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"agent config {path} is not valid TOML: {exc}") from exc
    return config_from_dict(doc, base_dir=path.resolve().parent)


def config_from_dict(doc: dict[str, Any], *, base_dir: Path) -> AgentConfig:
    """Build an AgentConfig from a parsed TOML document; relative paths are resolved against base_dir."""
    _check_keys(doc, AgentConfig, "")
    sections = {
        "hub": HubConfig, "runtime": RuntimeConfig, "source": SourceConfig, "spool": SpoolConfig,
        "uplink": UplinkConfig, "heartbeat": HeartbeatConfig, "ota": OtaConfig, "triggers": TriggersConfig,
    }
    for name in ("device_id", "hub", "source"):
        if name not in doc:
            raise InvalidInput(f"agent config: missing required key {name!r}")
    device_id = doc["device_id"]
    if not isinstance(device_id, str) or not NAME_RE.match(device_id):
        raise InvalidInput(
            f"agent config: device_id must be 1-128 letters, digits, '.', '_' or '-'; received {device_id!r}"
        )
    built: dict[str, Any] = {}
    for name, cls in sections.items():
        raw = doc.get(name, {})
        if not isinstance(raw, dict):
            raise InvalidInput(f"agent config: [{name}] must be a table; received {raw!r:.60}")
        _check_keys(raw, cls, name)
        built[name] = cls(**{k: _coerce(cls, name, k, v, base_dir) for k, v in raw.items()})
    cfg = AgentConfig(
        device_id=device_id,
        data_dir=_path(doc.get("data_dir", "flywheel-agent"), base_dir),
        **built,
    )
    _validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------


_PATH_KEYS = {("source", "path"), ("triggers", "default_spec")}


def _check_keys(raw: dict[str, Any], cls: type, section: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        where = f"[{section}]" if section else "top level"
        raise InvalidInput(f"agent config {where}: unknown key(s) {unknown}; expected a subset of {sorted(known)}")


def _coerce(cls: type, section: str, key: str, value: Any, base_dir: Path) -> Any:
    if (section, key) == ("source", "options"):
        return _ffmpeg_options(value)
    if (section, key) in _PATH_KEYS:
        if not isinstance(value, str):
            raise InvalidInput(f"agent config: {section}.{key} must be a path string; received {value!r}")
        return _path(value, base_dir) if value else None
    default = next(f for f in fields(cls) if f.name == key).default
    expected: type | tuple[type, ...] = str if default in (None, MISSING) else type(default)
    if expected is float:
        expected = (int, float)
    if isinstance(value, bool) and expected is not bool:
        raise InvalidInput(f"agent config: {section}.{key} must be {_tname(expected)}; received {value!r}")
    if not isinstance(value, expected):
        raise InvalidInput(f"agent config: {section}.{key} must be {_tname(expected)}; received {value!r}")
    number: Any = value
    return float(number) if isinstance(expected, tuple) else value


def _ffmpeg_options(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise InvalidInput(f"agent config: source.options must be a table of FFmpeg options; received {value!r:.80}")
    for k, v in value.items():
        if isinstance(v, (dict, list)):
            raise InvalidInput(f"agent config: source.options.{k} must be a string or a number; received {v!r:.80}")
    return tuple((str(k), str(v).lower() if isinstance(v, bool) else str(v)) for k, v in value.items())


def _tname(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return "a number"
    return {str: "a string", int: "an integer", bool: "true or false"}.get(t, t.__name__)


def _path(value: Any, base_dir: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"agent config: a path must be a non-empty string; received {value!r}")
    p = Path(value).expanduser()
    return p if p.is_absolute() else base_dir / p


def _validate(cfg: AgentConfig) -> None:
    def positive(what: str, v: float, *, allow_zero: bool = False) -> None:
        if v < 0 or (v == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise InvalidInput(f"agent config: {what} must be {bound}; received {v!r}")

    check_folder(cfg.data_dir, "agent config: data_dir", "the agent's enrollment, models and spool")
    if not cfg.hub.url.startswith(("http://", "https://")):
        raise InvalidInput(f"agent config: hub.url must start with http:// or https://; received {cfg.hub.url!r}")
    positive("hub.timeout_s", cfg.hub.timeout_s)
    if not 1 <= cfg.runtime.threads <= 64:
        raise InvalidInput(f"agent config: runtime.threads must be in 1..64; received {cfg.runtime.threads}")
    if not 1 <= cfg.runtime.batch_size <= 1024:
        raise InvalidInput(f"agent config: runtime.batch_size must be in 1..1024; received {cfg.runtime.batch_size}")
    if not 1 <= cfg.runtime.trigger_window <= 4096:
        raise InvalidInput(
            f"agent config: runtime.trigger_window must be in 1..4096; received {cfg.runtime.trigger_window}"
        )
    positive("runtime.trigger_max_delay_s", cfg.runtime.trigger_max_delay_s, allow_zero=True)
    if cfg.runtime.inference not in INFERENCE_MODES:
        raise InvalidInput(f"agent config: runtime.inference must be one of {list(INFERENCE_MODES)}; received "
                           f"{cfg.runtime.inference!r}")
    _validate_source(cfg.source)
    if cfg.spool.max_bytes < 64 * 1024:
        raise InvalidInput(f"agent config: spool.max_bytes must be >= 65536; received {cfg.spool.max_bytes}")
    positive("uplink.bytes_per_minute", cfg.uplink.bytes_per_minute, allow_zero=True)
    positive("uplink.backoff_base_s", cfg.uplink.backoff_base_s)
    if cfg.uplink.backoff_max_s < cfg.uplink.backoff_base_s:
        raise InvalidInput(
            f"agent config: uplink.backoff_max_s must be >= backoff_base_s ({cfg.uplink.backoff_base_s}); "
            f"received {cfg.uplink.backoff_max_s}"
        )
    positive("uplink.drain_timeout_s", cfg.uplink.drain_timeout_s, allow_zero=True)
    if not 0 <= cfg.uplink.linger_s <= 60:
        raise InvalidInput(f"agent config: uplink.linger_s must be in 0..60 seconds; received {cfg.uplink.linger_s}")
    if not 1 <= cfg.uplink.batch_max_cases <= 64:
        raise InvalidInput(
            f"agent config: uplink.batch_max_cases must be in 1..64; received {cfg.uplink.batch_max_cases}"
        )
    if cfg.uplink.batch_max_bytes < 64 * 1024:
        raise InvalidInput(
            f"agent config: uplink.batch_max_bytes must be >= 65536; received {cfg.uplink.batch_max_bytes}"
        )
    positive("heartbeat.interval_s", cfg.heartbeat.interval_s)
    positive("ota.poll_interval_s", cfg.ota.poll_interval_s)
    if not 1 <= cfg.ota.health_frames <= 256:
        raise InvalidInput(f"agent config: ota.health_frames must be in 1..256; received {cfg.ota.health_frames}")


def source_from_spec(spec: str, base: SourceConfig, *, cwd: Path) -> SourceConfig:
    """``base`` with its source replaced by a command-line ``spec``: ``KIND:PATH`` (npz, folder, replay, video;
    relative to ``cwd``), ``camera:DEVICE``, or a stream URL (``rtsp://...``, ``http://...``). The other keys
    (``max_fps``, timeouts...) stay as the config says, unless they do not apply to the new kind."""
    kind, sep, rest = spec.partition(":")
    if sep and rest.startswith("//"):
        kind, rest = "stream", spec
    elif not sep or kind not in SOURCE_KINDS or not rest:
        raise InvalidInput(
            f"--source must be KIND:PATH with KIND in {list(FILE_KINDS)}, camera:DEVICE, or a stream URL "
            f"such as rtsp://host/path; received {spec!r}")
    applies = {f.name for f in fields(SourceConfig) if kind in SOURCE_KEYS_FOR.get(f.name, (kind,))}
    keep = {k: getattr(base, k) for k in applies - {"kind", "path", "url", "device"}}
    if kind == "stream":
        keep["url"] = rest
    elif kind == "camera":
        keep["device"] = rest
    else:
        keep["path"] = _path(rest, cwd)
    out = SourceConfig(kind=kind, **keep)
    _validate_source(out)
    return out


def _validate_source(s: SourceConfig) -> None:
    if s.kind not in SOURCE_KINDS:
        raise InvalidInput(f"agent config: source.kind must be one of {list(SOURCE_KINDS)}; received {s.kind!r}")
    defaults = SourceConfig(kind=s.kind)
    for key, kinds in SOURCE_KEYS_FOR.items():
        if s.kind not in kinds and getattr(s, key) != getattr(defaults, key):
            hint = "; a live source comes at its own pace: source.max_fps caps it" if key == "fps" else ""
            raise InvalidInput(
                f"agent config: source.{key} applies to kind {' or '.join(map(repr, kinds))} only; "
                f"source.kind is {s.kind!r}{hint}")
    if s.kind in FILE_KINDS and s.path is None:
        raise InvalidInput(f"agent config: source.path is required for kind {s.kind!r}")
    if s.kind == "stream":
        if not s.url:
            raise InvalidInput("agent config: source.url is required for kind 'stream' (e.g. rtsp://host/path)")
        check_stream_url(s.url)
    if s.kind == "camera" and not s.device:
        raise InvalidInput("agent config: source.device is required for kind 'camera' (e.g. /dev/video0)")
    for key in ("fps", "max_fps"):
        v = getattr(s, key)
        if not 0 <= v < float("inf"):
            raise InvalidInput(f"agent config: source.{key} must be >= 0 (0: no limit); received {v!r}")
    if s.channels not in (1, 3):
        raise InvalidInput(f"agent config: source.channels must be 3 (RGB) or 1 (gray); received {s.channels!r}")
    for key in ("width", "height"):
        if not 0 <= getattr(s, key) <= 8192:
            raise InvalidInput(f"agent config: source.{key} must be in 0..8192 (0: as decoded); "
                               f"received {getattr(s, key)!r}")
    for key in ("open_timeout_s", "read_timeout_s", "reconnect_base_s"):
        if not 0 < getattr(s, key) < float("inf"):
            raise InvalidInput(f"agent config: source.{key} must be > 0 seconds; received {getattr(s, key)!r}")
    if not s.reconnect_base_s <= s.reconnect_max_s < float("inf"):
        raise InvalidInput(f"agent config: source.reconnect_max_s must be >= reconnect_base_s "
                           f"({s.reconnect_base_s}); received {s.reconnect_max_s!r}")
    if not 0 <= s.reconnect_deadline_s < float("inf"):
        raise InvalidInput(f"agent config: source.reconnect_deadline_s must be >= 0 seconds (0: never give up); "
                           f"received {s.reconnect_deadline_s!r}")
