"""The wire contract between edge agents, the hub, the labeling bridge and the trainer.

Plain dataclasses with ``to_json``/``from_json`` (no pydantic: this module runs on devices). Every
message carries ``schema`` so a peer can refuse a version it does not speak. ``from_json`` validates
types and ranges and raises :class:`fleet.errors.ProtocolError` naming the field, the value received
and what was expected. The hub validates the same shapes with its own models; a test proves that
what the edge builds, the hub accepts.

HTTP surface of the hub (all JSON unless said otherwise; devices send ``Authorization: Bearer``):

=======================================  =========================================================
``POST /v1/enroll``                      ``{device_id, fleet_secret, group}`` -> :class:`Enrollment`
``POST /v1/cases``                       multipart: ``case`` (:class:`Case` JSON), ``image`` (PNG)
``POST /v1/cases/batch``                 multipart: ``case_i``, ``image_i`` for i = 0..n-1 -> ``{results: [{case_id,
                                         status: created|already|duplicate|rejected, duplicate_of, error}]}``
``POST /v1/heartbeats``                  :class:`Heartbeat`
``GET  /v1/assignment``                  -> :class:`Assignment` for the calling device
``GET  /v1/models/{version}/manifest``   -> :class:`SignedManifest`
``GET  /v1/models/{version}/onnx``       -> the ONNX bytes
``POST /v1/ota-reports``                 :class:`OtaReport`
``GET  /v1/novelty-banks/{bank_id}``     -> the bank as ``.npz`` (see ``trigger.novelty``)
=======================================  =========================================================
"""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from fleet.errors import ProtocolError

SCHEMA_VERSION = 1
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

T = TypeVar("T", bound="_Message")


# ---------------------------------------------------------------------------------------------
# helpers shared by every message
# ---------------------------------------------------------------------------------------------


def check_name(value: Any, what: str) -> str:
    """Validate an identifier (device id, version, campaign id): safe in paths and URLs."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ProtocolError(
            f"{what} must be 1-128 characters of letters, digits, '.', '_' or '-' starting with a "
            f"letter or digit; received {value!r}"
        )
    return value


def check_sha256(value: Any, what: str) -> str:
    if not isinstance(value, str) or not SHA256_RE.match(value):
        raise ProtocolError(f"{what} must be 64 lowercase hex characters (sha256); received {value!r}")
    return value


def check_finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{what} must be a number; received {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ProtocolError(f"{what} must be finite; received {value!r}")
    return float(value)


def encode_embedding(vector: npt.NDArray[np.floating[Any]]) -> str:
    """A 1-D float vector as base64 of little-endian float16 (compact on the wire)."""
    arr = np.asarray(vector, dtype="<f2").reshape(-1)
    return base64.b64encode(arr.tobytes()).decode("ascii")


def decode_embedding(text: str) -> npt.NDArray[np.float32]:
    """Inverse of :func:`encode_embedding`; returns float32 of shape (d,)."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise ProtocolError(f"embedding must be base64 of float16 values; received {text[:40]!r}") from exc
    if len(raw) % 2:
        raise ProtocolError(f"embedding must hold a whole number of float16 values; got {len(raw)} bytes")
    return np.frombuffer(raw, dtype="<f2").astype(np.float32)


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, no spaces): what signatures are computed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _fields_of(obj: Any) -> dict[str, Any]:
    """``json.dumps`` hook: a dataclass message as a dict of its fields (nested messages come back here)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in fields(obj)}
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


class _Message:
    """Mixin: JSON round trip through ``to_dict``/``from_dict`` with strict key checking."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload, no-any-return]

    def to_json(self) -> str:
        try:  # the same JSON as to_dict's, without its deep copy (the agent encodes a case per flagged frame)
            return json.dumps(self, default=_fields_of, allow_nan=False, separators=(",", ":"))
        except ValueError as exc:
            raise ProtocolError(f"{type(self).__name__} holds a NaN or infinite number: {exc}") from exc

    @classmethod
    def from_json(cls: type[T], text: str | bytes) -> T:
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
            raise ProtocolError(f"{cls.__name__}: not valid JSON ({str(exc)[:200]})") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls: type[T], data: Any) -> T:
        if not isinstance(data, dict):
            raise ProtocolError(f"{cls.__name__} must be a JSON object; received {type(data).__name__}")
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ProtocolError(f"{cls.__name__}: unknown field(s) {unknown}; expected a subset of {sorted(known)}")
        schema = data.get("schema", SCHEMA_VERSION)
        if schema != SCHEMA_VERSION:
            raise ProtocolError(f"{cls.__name__}: schema {schema!r} is not supported; expected {SCHEMA_VERSION}")
        try:
            obj = cls._build(data)
        except TypeError as exc:
            raise ProtocolError(f"{cls.__name__}: {exc}") from exc
        obj.validate()
        return obj

    @classmethod
    def _build(cls: type[T], data: dict[str, Any]) -> T:
        return cls(**data)

    def validate(self) -> None:
        """Raise ProtocolError if a field is out of its range. Subclasses extend this."""


def _opt(value: Any, check: Any, what: str) -> Any:
    return None if value is None else check(value, what)


def _int(value: Any, what: str, *, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{what} must be an integer; received {value!r:.80}")
    if lo is not None and value < lo:
        raise ProtocolError(f"{what} must be >= {lo}; received {value}")
    if hi is not None and value > hi:
        raise ProtocolError(f"{what} must be <= {hi}; received {value!r:.40}")
    return value


def _str(value: Any, what: str, *, max_len: int = 256) -> str:
    if not isinstance(value, str) or len(value) > max_len:
        raise ProtocolError(f"{what} must be a string of at most {max_len} characters; received {value!r:.80}")
    return value


def _probs(value: Any, what: str) -> list[float]:
    if not isinstance(value, list) or not value:
        raise ProtocolError(f"{what} must be a non-empty list of probabilities; received {value!r:.80}")
    out = [check_finite(v, f"{what}[{i}]") for i, v in enumerate(value)]
    if any(p < 0 or p > 1 for p in out) or abs(sum(out) - 1.0) > 1e-3:
        raise ProtocolError(f"{what} must be probabilities in [0, 1] summing to 1; received sum {sum(out):.4f}")
    return out


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------


@dataclass
class TriggerHit:
    """One trigger that fired for a frame, with the value that made it fire."""

    name: str
    value: float
    threshold: float | None = None

    def validate(self) -> None:
        _str(self.name, "trigger name", max_len=64)
        check_finite(self.value, f"trigger {self.name!r} value")
        _opt(self.threshold, check_finite, f"trigger {self.name!r} threshold")


@dataclass
class Case(_Message):
    """A frame a device flagged: everything the hub needs to select, label and learn from it."""

    case_id: str
    device_id: str
    captured_at: float  # unix seconds
    model_version: str
    predicted_class: int
    probs: list[float]
    image_sha256: str
    image_size: int  # bytes of the PNG
    priority: float = 0.0
    scores: dict[str, float] = field(default_factory=dict)
    triggers: list[TriggerHit] = field(default_factory=list)
    campaign_id: str | None = None
    campaign_version: int | None = None
    human_action: int | None = None
    challenger_version: str | None = None
    challenger_class: int | None = None
    challenger_probs: list[float] | None = None
    tags: dict[str, str] = field(default_factory=dict)
    embedding: str | None = None  # see encode_embedding
    schema: int = SCHEMA_VERSION

    @classmethod
    def _build(cls, data: dict[str, Any]) -> Case:
        data = dict(data)
        hits = data.get("triggers", [])
        if not isinstance(hits, list):
            raise ProtocolError(f"Case.triggers must be a list; received {type(hits).__name__}")
        parsed = []
        for h in hits:
            if not isinstance(h, dict):
                raise ProtocolError(f"Case.triggers items must be objects; received {h!r:.80}")
            parsed.append(TriggerHit(**h))
        data["triggers"] = parsed
        return cls(**data)

    def validate(self) -> None:
        check_name(self.case_id, "case_id")
        check_name(self.device_id, "device_id")
        check_name(self.model_version, "model_version")
        check_finite(self.captured_at, "captured_at")
        probs = _probs(self.probs, "probs")
        _int(self.predicted_class, "predicted_class", lo=0)
        if self.predicted_class >= len(probs):
            raise ProtocolError(f"predicted_class {self.predicted_class} is out of range for {len(probs)} classes")
        check_sha256(self.image_sha256, "image_sha256")
        _int(self.image_size, "image_size", lo=1)
        p = check_finite(self.priority, "priority")
        if not 0.0 <= p <= 1.0:
            raise ProtocolError(f"priority must be in [0, 1]; received {p}")
        if not isinstance(self.scores, dict):
            raise ProtocolError(f"scores must be an object of name -> number; received {self.scores!r:.80}")
        for k, v in self.scores.items():
            _str(k, "score name", max_len=64)
            check_finite(v, f"scores[{k!r}]")
        for hit in self.triggers:
            hit.validate()
        _opt(self.campaign_id, check_name, "campaign_id")
        if self.campaign_version is not None:
            _int(self.campaign_version, "campaign_version", lo=0, hi=2**31 - 1)  # a database INTEGER
        if self.human_action is not None:
            _int(self.human_action, "human_action", lo=0)
        _opt(self.challenger_version, check_name, "challenger_version")
        if self.challenger_class is not None:
            _int(self.challenger_class, "challenger_class", lo=0)
        if self.challenger_probs is not None:
            _probs(self.challenger_probs, "challenger_probs")
        if not isinstance(self.tags, dict) or len(self.tags) > 32:
            raise ProtocolError(f"tags must be an object of at most 32 string pairs; received {self.tags!r:.80}")
        for tag, text in self.tags.items():
            _str(tag, "tag name", max_len=64)
            _str(text, f"tags[{tag!r}]", max_len=256)
        if self.embedding is not None:
            emb = decode_embedding(_str(self.embedding, "embedding", max_len=65536))
            if not np.all(np.isfinite(emb)):
                raise ProtocolError("embedding holds NaN or infinite values")


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


@dataclass
class InputSpec(_Message):
    """How to turn a frame into the model's input tensor; the edge reads this, never hard-codes it."""

    height: int
    width: int
    channels: int  # 1 or 3
    mean: list[float]
    std: list[float]
    layout: str = "NCHW"
    dtype: str = "float32"
    scale: float = 1.0 / 255.0  # applied to uint8 pixels before mean/std

    def validate(self) -> None:
        _int(self.height, "input.height", lo=1)
        _int(self.width, "input.width", lo=1)
        if self.channels not in (1, 3):
            raise ProtocolError(f"input.channels must be 1 or 3; received {self.channels!r}")
        for name, seq in (("mean", self.mean), ("std", self.std)):
            if not isinstance(seq, list) or len(seq) != self.channels:
                raise ProtocolError(f"input.{name} must list {self.channels} numbers; received {seq!r}")
            for v in seq:
                check_finite(v, f"input.{name}")
        if any(s <= 0 for s in self.std):
            raise ProtocolError(f"input.std must be positive; received {self.std}")
        if self.layout not in ("NCHW", "NHWC"):
            raise ProtocolError(f"input.layout must be NCHW or NHWC; received {self.layout!r}")
        if self.dtype != "float32":
            raise ProtocolError(f"input.dtype must be float32; received {self.dtype!r}")
        check_finite(self.scale, "input.scale")


@dataclass
class ModelManifest(_Message):
    """Everything a device needs to know about a model besides its ONNX bytes. Signed with ed25519."""

    version: str
    onnx_sha256: str
    onnx_size: int
    input: InputSpec
    class_names: list[str]
    embedding_dim: int
    parent_version: str | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    data_snapshot: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    created_at: float = 0.0
    outputs: list[str] = field(default_factory=lambda: ["logits", "embedding"])
    schema: int = SCHEMA_VERSION

    @classmethod
    def _build(cls, data: dict[str, Any]) -> ModelManifest:
        data = dict(data)
        spec = data.get("input")
        data["input"] = spec if isinstance(spec, InputSpec) else InputSpec.from_dict(spec)
        return cls(**data)

    def validate(self) -> None:
        check_name(self.version, "version")
        _opt(self.parent_version, check_name, "parent_version")
        check_sha256(self.onnx_sha256, "onnx_sha256")
        _int(self.onnx_size, "onnx_size", lo=1)
        self.input.validate()
        if not isinstance(self.class_names, list) or len(self.class_names) < 2:
            raise ProtocolError(f"class_names must list at least 2 names; received {self.class_names!r:.80}")
        for n in self.class_names:
            _str(n, "class name", max_len=128)
        _int(self.embedding_dim, "embedding_dim", lo=1)
        for k, v in {**self.thresholds, **self.metrics}.items():
            _str(k, "threshold/metric name", max_len=128)
            check_finite(v, f"threshold/metric {k!r}")
        check_finite(self.created_at, "created_at")
        if self.outputs != ["logits", "embedding"]:
            raise ProtocolError(f"outputs must be ['logits', 'embedding']; received {self.outputs!r}")

    def canonical_bytes(self) -> bytes:
        """The exact bytes the signature covers."""
        return canonical_json(self.to_dict())


@dataclass
class SignedManifest(_Message):
    """A manifest and the ed25519 signature over its canonical bytes."""

    manifest: ModelManifest
    signature: str  # base64 of the 64-byte ed25519 signature
    key_id: str  # sha256 (hex, first 16) of the raw public key that made it
    schema: int = SCHEMA_VERSION

    @classmethod
    def _build(cls, data: dict[str, Any]) -> SignedManifest:
        data = dict(data)
        m = data.get("manifest")
        data["manifest"] = m if isinstance(m, ModelManifest) else ModelManifest.from_dict(m)
        return cls(**data)

    def validate(self) -> None:
        self.manifest.validate()
        _str(self.signature, "signature", max_len=128)
        _str(self.key_id, "key_id", max_len=64)


# ---------------------------------------------------------------------------------------------
# fleet control
# ---------------------------------------------------------------------------------------------


@dataclass
class Enrollment(_Message):
    """The hub's answer to an enrollment: the device's token and the fleet key to pin."""

    device_id: str
    token: str
    fleet_public_key: str  # base64 of the raw 32-byte ed25519 public key
    hub_time: float = 0.0
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.device_id, "device_id")
        _str(self.token, "token", max_len=512)
        _str(self.fleet_public_key, "fleet_public_key", max_len=128)


@dataclass
class ModelRef(_Message):
    """A model the device should hold: its version and the sha256 of its ONNX file."""

    version: str
    onnx_sha256: str
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.version, "model version")
        check_sha256(self.onnx_sha256, "onnx_sha256")


@dataclass
class CampaignRef(_Message):
    """A campaign assigned to a device: its id, version, expiry and the trigger spec document."""

    campaign_id: str
    version: int
    spec: dict[str, Any]
    expires_at: float | None = None  # unix seconds
    novelty_bank: str | None = None  # bank id served at /v1/novelty-banks/{id}
    novelty_bank_sha256: str | None = None
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.campaign_id, "campaign_id")
        _int(self.version, "campaign version", lo=0)
        if not isinstance(self.spec, dict):
            raise ProtocolError(f"campaign spec must be an object; received {type(self.spec).__name__}")
        _opt(self.expires_at, check_finite, "expires_at")
        _opt(self.novelty_bank, check_name, "novelty_bank")
        _opt(self.novelty_bank_sha256, check_sha256, "novelty_bank_sha256")


@dataclass
class Assignment(_Message):
    """What a device should run now: the active model, an optional shadow challenger, campaigns."""

    device_id: str
    active: ModelRef | None
    challenger: ModelRef | None = None
    campaigns: list[CampaignRef] = field(default_factory=list)
    rollout_id: str | None = None
    issued_at: float = 0.0
    schema: int = SCHEMA_VERSION

    @classmethod
    def _build(cls, data: dict[str, Any]) -> Assignment:
        data = dict(data)
        for key in ("active", "challenger"):
            if data.get(key) is not None:
                data[key] = ModelRef.from_dict(data[key])
        camps = data.get("campaigns", [])
        if not isinstance(camps, list):
            raise ProtocolError(f"Assignment.campaigns must be a list; received {type(camps).__name__}")
        data["campaigns"] = [CampaignRef.from_dict(c) for c in camps]
        return cls(**data)

    def validate(self) -> None:
        check_name(self.device_id, "device_id")
        for ref in (self.active, self.challenger):
            if ref is not None:
                ref.validate()
        for c in self.campaigns:
            c.validate()
        _opt(self.rollout_id, check_name, "rollout_id")
        check_finite(self.issued_at, "issued_at")


HEARTBEAT_COUNTERS = ("frames_seen", "flagged", "uploaded", "evicted", "upload_failures", "health_failures")
MAX_COUNTER = 2**53  # every heartbeat count: exact as a JSON number anywhere, and far beyond any device's life


@dataclass
class Heartbeat(_Message):
    """A device's periodic counters. Counters are cumulative since the agent started (``boot_id``)."""

    device_id: str
    sent_at: float
    boot_id: str
    model_version: str | None
    challenger_version: str | None = None
    counters: dict[str, int] = field(default_factory=dict)
    spool_bytes: int = 0
    spool_items: int = 0
    human_compared: int = 0  # frames where the human's action was known
    human_disagreed: int = 0  # ... and the model's top-1 differed from it
    challenger_compared: int = 0
    challenger_agreed: int = 0
    latency_p50_ms: float = 0.0
    latency_p95_ms: float = 0.0
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.device_id, "device_id")
        check_name(self.boot_id, "boot_id")
        check_finite(self.sent_at, "sent_at")
        _opt(self.model_version, check_name, "model_version")
        _opt(self.challenger_version, check_name, "challenger_version")
        if not isinstance(self.counters, dict):
            raise ProtocolError(f"counters must be an object; received {self.counters!r:.80}")
        for k, v in self.counters.items():
            if k not in HEARTBEAT_COUNTERS:
                raise ProtocolError(f"unknown counter {k!r}; expected one of {list(HEARTBEAT_COUNTERS)}")
            _int(v, f"counters[{k!r}]", lo=0, hi=MAX_COUNTER)
        for name in ("spool_bytes", "spool_items", "human_compared", "human_disagreed",
                     "challenger_compared", "challenger_agreed"):
            _int(getattr(self, name), name, lo=0, hi=MAX_COUNTER)
        if self.human_disagreed > self.human_compared:
            raise ProtocolError("human_disagreed cannot exceed human_compared")
        if self.challenger_agreed > self.challenger_compared:
            raise ProtocolError("challenger_agreed cannot exceed challenger_compared")
        for name in ("latency_p50_ms", "latency_p95_ms"):
            if check_finite(getattr(self, name), name) < 0:
                raise ProtocolError(f"{name} must be >= 0")


OTA_OUTCOMES = ("installed", "refused", "rolled_back")


@dataclass
class OtaReport(_Message):
    """The outcome of one over-the-air update attempt on a device."""

    device_id: str
    version: str
    outcome: str  # one of OTA_OUTCOMES
    reason: str = ""
    previous_version: str | None = None
    reported_at: float = 0.0
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.device_id, "device_id")
        check_name(self.version, "version")
        if self.outcome not in OTA_OUTCOMES:
            raise ProtocolError(f"outcome must be one of {list(OTA_OUTCOMES)}; received {self.outcome!r}")
        _str(self.reason, "reason", max_len=2000)
        _opt(self.previous_version, check_name, "previous_version")
        check_finite(self.reported_at, "reported_at")
