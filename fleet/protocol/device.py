"""Device messages: what an edge agent sends the hub (cases, heartbeats, OTA reports) and what it gets back
(its enrollment and its assignment).

HTTP surface of the hub for devices (JSON unless said otherwise; devices send ``Authorization: Bearer``):

=======================================  =========================================================
``POST /v1/enroll``                      :class:`EnrollRequest` -> :class:`Enrollment`
``POST /v1/cases``                       multipart: ``case`` (:class:`Case`), ``image`` (PNG) -> :class:`CaseReceipt`
``POST /v1/cases/batch``                 multipart: ``case_i``, ``image_i``, i = 0..n-1 -> :class:`BatchReceipt`
``POST /v1/heartbeats``                  :class:`Heartbeat`
``GET  /v1/assignment``                  -> :class:`Assignment` for the calling device
``GET  /v1/models/{version}/manifest``   -> :class:`~fleet.protocol.model.SignedManifest`
``GET  /v1/models/{version}/onnx``       -> the ONNX bytes
``POST /v1/ota-reports``                 :class:`OtaReport`
``GET  /v1/novelty-banks/{bank_id}``     -> the bank as ``.npz`` (see ``trigger.novelty``)
``POST /v1/keys/rotations``              :class:`KeyRotation` (admin) -> :class:`KeyRotation`
``GET  /v1/keys/rotations``              -> :class:`KeyRotationList`
=======================================  =========================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from fleet.errors import ProtocolError
from fleet.protocol.base import (
    DB_INT,
    MAX_NAME,
    SCHEMA_VERSION,
    Message,
    canonical_json,
    check_finite,
    check_fraction,
    check_int,
    check_name,
    check_one_of,
    check_sha256,
    check_str,
    check_tags,
    decode_embedding,
    opt,
)
from fleet.protocol.tasks import Prediction, TaskMessage

# ---------------------------------------------------------------------------------------------
# enrollment
# ---------------------------------------------------------------------------------------------


@dataclass
class EnrollRequest(Message):
    """A device asks for its token, with one credential: the fleet secret (new ids only), a one-time
    enrollment token an admin issued, or (re-enrolling) its own current token as the bearer."""

    device_id: str
    fleet_secret: str = ""
    enrollment_token: str = ""
    group: str = "default"
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.device_id, "device_id")
        check_name(self.group, "group")
        check_str(self.fleet_secret, "fleet_secret", max_len=512)
        check_str(self.enrollment_token, "enrollment_token", max_len=512)


@dataclass
class Enrollment(Message):
    """The hub's answer to an enrollment: the device's token and the fleet key to pin."""

    device_id: str
    token: str
    fleet_public_key: str  # base64 of the raw 32-byte ed25519 public key
    hub_time: float = 0.0
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.device_id, "device_id")
        check_str(self.token, "token", max_len=512)
        check_str(self.fleet_public_key, "fleet_public_key", max_len=128)


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------


@dataclass
class TriggerHit(Message):
    """One trigger that fired for a frame, with the value that made it fire."""

    VERSIONED: ClassVar[bool] = False

    name: str
    value: float
    threshold: float | None = None

    def validate(self) -> None:
        check_str(self.name, "trigger name", max_len=MAX_NAME)
        check_finite(self.value, f"trigger {self.name!r} value")
        opt(self.threshold, check_finite, f"trigger {self.name!r} threshold")


@dataclass
class ChallengerOutput(TaskMessage):
    """What the shadow challenger predicted on the same frame."""

    TASK_FIELDS: ClassVar[tuple[str, ...]] = ("prediction",)

    VERSIONED: ClassVar[bool] = False

    version: str
    prediction: Prediction

    def validate(self) -> None:
        check_name(self.version, "challenger.version")
        self.prediction.validate()


@dataclass
class Case(TaskMessage):
    """A frame a device flagged: everything the hub needs to select, label and learn from it.

    ``case_id`` is made by the device and is the upload's idempotency key. ``prediction`` is the model's
    output for the frame's task; ``human_action`` (what the person at the device did) and the label an
    annotator gives later have the same shape without the model's scores.
    """

    TASK_FIELDS: ClassVar[tuple[str, ...]] = ("prediction", "human_action")
    PARTS: ClassVar[dict[str, type[Message] | str]] = {"challenger": ChallengerOutput}
    LISTS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {"triggers": (TriggerHit, 64)}

    case_id: str
    device_id: str
    captured_at: float  # unix seconds
    model_version: str
    prediction: Prediction
    image_sha256: str
    image_size: int  # bytes of the PNG
    priority: float = 0.0
    scores: dict[str, float] = field(default_factory=dict)
    triggers: list[TriggerHit] = field(default_factory=list)
    campaign_id: str | None = None
    campaign_version: int | None = None
    human_action: Prediction | None = None
    challenger: ChallengerOutput | None = None
    tags: dict[str, str] = field(default_factory=dict)
    embedding: str | None = None  # see encode_embedding
    schema: int = SCHEMA_VERSION

    @property
    def task(self) -> str:
        return self.prediction.task

    def validate(self) -> None:
        check_name(self.case_id, "case_id")
        check_name(self.device_id, "device_id")
        check_name(self.model_version, "model_version")
        check_finite(self.captured_at, "captured_at")
        self.prediction.validate()
        check_sha256(self.image_sha256, "image_sha256")
        check_int(self.image_size, "image_size", lo=1)
        check_fraction(self.priority, "priority")
        if not isinstance(self.scores, dict) or len(self.scores) > 64:
            raise ProtocolError(f"scores must be an object of at most 64 name -> number; received {self.scores!r:.80}")
        for k, v in self.scores.items():
            check_str(k, "score name", max_len=MAX_NAME)
            check_finite(v, f"scores[{k!r}]")
        for hit in self.triggers:
            hit.validate()
        opt(self.campaign_id, check_name, "campaign_id")
        opt(self.campaign_version, check_int, "campaign_version", lo=0, hi=DB_INT)
        if self.human_action is not None:
            self.human_action.validate()
            _same_task(self.human_action.task, self.task, "human_action")
        if self.challenger is not None:
            self.challenger.validate()
            _same_task(self.challenger.prediction.task, self.task, "challenger.prediction")
        check_tags(self.tags)
        if self.embedding is not None:
            emb = decode_embedding(check_str(self.embedding, "embedding", max_len=65536))
            if not np.all(np.isfinite(emb)):
                raise ProtocolError("embedding holds NaN or infinite values")


CASE_STATUSES = ("created", "already", "duplicate", "rejected")


@dataclass
class CaseReceipt(Message):
    """The hub's answer to one uploaded case: ``created`` (201), ``already`` there (200, same content),
    ``duplicate`` of another case's image, or ``rejected`` (in a batch only, with the 4xx it would get)."""

    case_id: str
    status: str
    duplicate_of: str | None = None
    error_status: int | None = None
    error: str | None = None
    retry_after: float | None = None  # a case refused 429 (the fleet's upload cap): seconds to wait before again
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_str(self.case_id, "case_id", max_len=128)
        check_one_of(self.status, CASE_STATUSES, "status")
        opt(self.duplicate_of, check_name, "duplicate_of")
        if self.status == "rejected":
            check_int(self.error_status, "error_status", lo=400, hi=599)
            check_str(self.error, "error", max_len=4000)
        if self.retry_after is not None and not (check_finite(self.retry_after, "retry_after") >= 0):
            raise ProtocolError(f"retry_after must be >= 0 seconds; received {self.retry_after!r}")


@dataclass
class BatchReceipt(Message):
    """The hub's answer to ``POST /v1/cases/batch``: one receipt per case, in order."""

    LISTS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {"results": (CaseReceipt, 10_000)}

    results: list[CaseReceipt]
    schema: int = SCHEMA_VERSION


# ---------------------------------------------------------------------------------------------
# assignment
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelRef(Message):
    """A model the device should hold: its version and the sha256 of its ONNX file."""

    VERSIONED: ClassVar[bool] = False

    version: str
    onnx_sha256: str

    def validate(self) -> None:
        check_name(self.version, "model version")
        check_sha256(self.onnx_sha256, "onnx_sha256")


@dataclass
class CampaignRef(Message):
    """A campaign assigned to a device: its id, version, expiry and the trigger spec document.

    ``novelty_bank_version`` is the model version whose embedding space the bank holds. A device scores
    novelty only against a bank of the model it runs; when the hub names a version but no bank, the bank for
    that model does not exist yet and the device pauses the campaign until it does.
    """

    VERSIONED: ClassVar[bool] = False

    campaign_id: str
    version: int
    spec: dict[str, Any]
    expires_at: float | None = None  # unix seconds
    novelty_bank: str | None = None  # bank id served at /v1/novelty-banks/{id}
    novelty_bank_sha256: str | None = None
    novelty_bank_version: str | None = None  # the model version whose embeddings the bank holds

    def validate(self) -> None:
        check_name(self.campaign_id, "campaign_id")
        check_int(self.version, "campaign version", lo=0, hi=DB_INT)
        if not isinstance(self.spec, dict):
            raise ProtocolError(f"campaign spec must be an object; received {type(self.spec).__name__}")
        opt(self.expires_at, check_finite, "expires_at")
        opt(self.novelty_bank, check_name, "novelty_bank")
        opt(self.novelty_bank_sha256, check_sha256, "novelty_bank_sha256")
        opt(self.novelty_bank_version, check_name, "novelty_bank_version")


MAX_ROTATIONS = 64


@dataclass
class KeyRotation(Message):
    """A new fleet signing key, announced under the key it replaces (fleet.signing.sign_rotation): a device that
    trusts the key ``old_key_id`` names trusts ``new_public_key`` from then on, and the old key's model signatures
    only until ``old_key_until`` (unix seconds): the overlap in which both verify. ``signature``: base64 ed25519
    by the old key over :meth:`signed_bytes`."""

    new_public_key: str  # base64 of the raw 32-byte ed25519 public key
    old_key_id: str
    old_key_until: float
    issued_at: float
    signature: str
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_str(self.new_public_key, "new_public_key", max_len=128)
        check_str(self.old_key_id, "old_key_id", max_len=64)
        check_finite(self.issued_at, "issued_at")
        if check_finite(self.old_key_until, "old_key_until") < self.issued_at:
            raise ProtocolError(f"old_key_until ({self.old_key_until}) is before issued_at ({self.issued_at}): the "
                                f"overlap in which both keys verify must not be negative")
        check_str(self.signature, "signature", max_len=128)

    def signed_bytes(self) -> bytes:
        """What the old key signs: every field but the signature, canonical JSON, with a purpose so the bytes
        cannot be mistaken for a manifest's."""
        return canonical_json({"purpose": "flywheel fleet key rotation", "new_public_key": self.new_public_key,
                               "old_key_id": self.old_key_id, "old_key_until": self.old_key_until,
                               "issued_at": self.issued_at})


@dataclass
class KeyRotationList(Message):
    """The fleet's key rotations, oldest first: a device that pinned the first key follows them in order."""

    LISTS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {"rotations": (KeyRotation, MAX_ROTATIONS)}

    rotations: list[KeyRotation]
    schema: int = SCHEMA_VERSION


@dataclass
class Assignment(Message):
    """What a device should run now: the active model, an optional shadow challenger, campaigns."""

    PARTS: ClassVar[dict[str, type[Message] | str]] = {"active": ModelRef, "challenger": ModelRef}
    LISTS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {"campaigns": (CampaignRef, 256),
                                                                   "key_rotations": (KeyRotation, MAX_ROTATIONS)}

    device_id: str
    active: ModelRef | None
    challenger: ModelRef | None = None
    campaigns: list[CampaignRef] = field(default_factory=list)
    rollout_id: str | None = None
    issued_at: float = 0.0
    key_rotations: list[KeyRotation] = field(default_factory=list)  # the fleet key's rotations, oldest first
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.device_id, "device_id")
        for ref in (self.active, self.challenger):
            if ref is not None:
                ref.validate()
        for c in self.campaigns:
            c.validate()
        opt(self.rollout_id, check_name, "rollout_id")
        check_finite(self.issued_at, "issued_at")


# ---------------------------------------------------------------------------------------------
# telemetry
# ---------------------------------------------------------------------------------------------

MAX_CLASSES = 1000  # classes a heartbeat's prediction histogram may hold
HEARTBEAT_COUNTERS = ("frames_seen", "flagged", "uploaded", "evicted", "upload_failures", "health_failures")


@dataclass
class Heartbeat(Message):
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
    # what the model ``predicted_version`` predicted since it became active in this boot: frames per top-1 class
    # (a detector: per best box's class), and frames with no prediction (a detector that found nothing); the
    # hub compares a candidate's with its incumbent's (fleet.hub.evidence, rule 5)
    predicted_version: str | None = None
    predicted_counts: list[int] = field(default_factory=list)
    predicted_none: int = 0
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.device_id, "device_id")
        check_name(self.boot_id, "boot_id")
        opt(self.predicted_version, check_name, "predicted_version")
        if not isinstance(self.predicted_counts, list) or len(self.predicted_counts) > MAX_CLASSES:
            raise ProtocolError(f"predicted_counts must be a list of at most {MAX_CLASSES} counts; received "
                                f"{self.predicted_counts!r:.80}")
        for i, v in enumerate(self.predicted_counts):
            check_int(v, f"predicted_counts[{i}]", lo=0)
        check_int(self.predicted_none, "predicted_none", lo=0)
        check_finite(self.sent_at, "sent_at")
        opt(self.model_version, check_name, "model_version")
        opt(self.challenger_version, check_name, "challenger_version")
        if not isinstance(self.counters, dict):
            raise ProtocolError(f"counters must be an object; received {self.counters!r:.80}")
        for k, v in self.counters.items():
            if k not in HEARTBEAT_COUNTERS:
                raise ProtocolError(f"unknown counter {k!r:.40}; expected one of {list(HEARTBEAT_COUNTERS)}")
            check_int(v, f"counters[{k!r}]", lo=0)
        for name in ("spool_bytes", "spool_items", "human_compared", "human_disagreed",
                     "challenger_compared", "challenger_agreed"):
            check_int(getattr(self, name), name, lo=0)
        if self.human_disagreed > self.human_compared:
            raise ProtocolError("human_disagreed cannot exceed human_compared")
        if self.challenger_agreed > self.challenger_compared:
            raise ProtocolError("challenger_agreed cannot exceed challenger_compared")
        for name in ("latency_p50_ms", "latency_p95_ms"):
            if check_finite(getattr(self, name), name) < 0:
                raise ProtocolError(f"{name} must be >= 0")


OTA_OUTCOMES = ("installed", "refused", "rolled_back")


@dataclass
class OtaReport(Message):
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
        check_one_of(self.outcome, OTA_OUTCOMES, "outcome")
        check_str(self.reason, "reason", max_len=2000)
        opt(self.previous_version, check_name, "previous_version")
        check_finite(self.reported_at, "reported_at")


def _same_task(task: str, expected: str, what: str) -> None:
    if task != expected:
        raise ProtocolError(f"{what} is a {task!r} payload; the case's prediction is {expected!r}")
