"""Model registry messages: model versions, promotions and rollbacks, staged rollouts with their field
metrics. The trainer publishes and rolls out; an admin promotes, retires and rolls back. Campaigns and
novelty banks are in :mod:`fleet.protocol.campaigns`.

==============================================  ================================================================
``POST /v1/models``                             multipart ``onnx``, ``manifest`` -> :class:`ModelReceipt`
``GET  /v1/models``                             -> :class:`ModelList`
``GET  /v1/models/{version}``                   -> :class:`ModelPublic`
``POST /v1/models/{version}/promote``           :class:`PromoteRequest` -> :class:`Promotion`
``POST /v1/models/{version}/retire``            -> :class:`ModelPublic`
``POST /v1/models/rollback``                    :class:`RollbackRequest` -> :class:`RollbackReceipt`
``POST /v1/models/{version}/rescore``           :class:`RescoreRequest` -> :class:`RescoreProgress`
``POST /v1/shadows``                            :class:`ShadowCreate` -> :class:`ShadowPublic`
``GET  /v1/shadows``                            -> :class:`ShadowList`
``GET  /v1/shadows/{id}``                       -> :class:`ShadowPublic` (``/promote`` :class:`RolloutCreate`-like,
                                                ``/cancel`` the same)
``POST /v1/rollouts``                           :class:`RolloutCreate` -> :class:`RolloutPublic`
``GET  /v1/rollouts``                           -> :class:`RolloutList`
``GET  /v1/rollouts/{id}``                      -> :class:`RolloutPublic` (``/advance``, ``/rollback`` the same)
==============================================  ================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from fleet.errors import ProtocolError
from fleet.protocol.base import (
    SCHEMA_VERSION,
    Message,
    check_bool,
    check_finite,
    check_fraction,
    check_int,
    check_name,
    check_names_list,
    check_number_map,
    check_one_of,
    check_sha256,
    check_str,
    opt,
)

MODEL_STATUSES = ("candidate", "canary", "active", "retired")
ROLLOUT_STATES = ("running", "completed", "rolled_back", "aborted")
ROLLOUT_KINDS = ("staged", "promotion", "override")
MAX_STAGES = 20
MAX_REASON = 2000

# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelPublic(Message):
    """A registered model version: its lineage, status, ONNX file and what its manifest declares."""

    version: str
    status: str
    onnx_sha256: str
    onnx_size: int
    class_names: list[str]
    embedding_dim: int
    created_at: float  # from the manifest
    uploaded_at: float
    status_changed_at: float
    parent_version: str | None = None
    activated_at: float | None = None  # the last time it became active
    metrics: dict[str, float] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.version, "version")
        check_one_of(self.status, MODEL_STATUSES, "status")
        check_sha256(self.onnx_sha256, "onnx_sha256")
        check_int(self.onnx_size, "onnx_size", lo=1)
        check_names_list(self.class_names, "class_names", max_len=100_000)
        check_int(self.embedding_dim, "embedding_dim", lo=1, hi=65536)
        for name in ("created_at", "uploaded_at", "status_changed_at"):
            check_finite(getattr(self, name), name)
        opt(self.parent_version, check_name, "parent_version")
        opt(self.activated_at, check_finite, "activated_at")
        check_number_map(self.metrics, "metrics")


@dataclass
class ModelList(Message):
    """Every registered version, oldest upload first."""

    LISTS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {"models": (ModelPublic, 1_000_000)}

    models: list[ModelPublic]
    schema: int = SCHEMA_VERSION


@dataclass
class ModelReceipt(Message):
    """The hub's answer to an upload: the version registered as a ``candidate`` (201), or ``already`` there
    with the same bytes and manifest (200, its status as it stands)."""

    version: str
    status: str
    already: bool = False
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.version, "version")
        check_one_of(self.status, MODEL_STATUSES, "status")
        check_bool(self.already, "already")


@dataclass
class PromoteRequest(Message):
    """Promote a version: at once when nothing is active, else a rollout to the whole fleet; ``override``
    makes it active now (recorded with ``reason``, still undone if the devices' evidence says so)."""

    override: bool = False
    reason: str = "promoted by an operator"
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_bool(self.override, "override")
        check_reason(self.reason, "reason")
        if not self.reason.strip():
            raise ProtocolError("reason must say why (1-2000 characters); received an empty string")


@dataclass
class RescoreRequest(Message):
    """Re-score up to ``limit`` more cases of the pool with a model (fleet.hub.rescore), ``batch`` images per
    forward pass."""

    limit: int = 1000
    batch: int = 64
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_int(self.limit, "limit", lo=1, hi=100_000)
        check_int(self.batch, "batch", lo=1, hi=1024)


@dataclass
class RescoreProgress(Message):
    """How far re-scoring the pool with ``version`` has come: cases scored (and ``failed``, whose image could
    not be read or run) by this call, and cases still waiting (``remaining``; 0 = the pool is in its space)."""

    version: str
    scored: int
    failed: int
    remaining: int
    seconds: float = 0.0
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.version, "version")
        for name in ("scored", "failed", "remaining"):
            check_int(getattr(self, name), name, lo=0)
        check_finite(self.seconds, "seconds")


@dataclass
class RollbackRequest(Message):
    """Roll back: the running rollout, or with none, re-activate ``to`` (default: the previously active
    version). ``to`` only means something to ``POST /v1/models/rollback``; a rollout rolls back to its
    incumbent."""

    to: str | None = None
    reason: str = "rolled back by an operator"
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        opt(self.to, check_name, "to")
        check_reason(self.reason, "reason")


@dataclass
class RollbackReceipt(Message):
    """What a rollback did: the version it took back, the version active now, and the rollout it ended."""

    rolled_back: str | None
    active: str | None
    rollout_id: str | None = None
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        opt(self.rolled_back, check_name, "rolled_back")
        opt(self.active, check_name, "active")
        opt(self.rollout_id, check_name, "rollout_id")


# ---------------------------------------------------------------------------------------------
# rollouts and field metrics
# ---------------------------------------------------------------------------------------------


@dataclass
class FieldCounts(Message):
    """Heartbeat counters summed over the devices that ran one model version (only what they were assigned)."""

    VERSIONED: ClassVar[bool] = False

    heartbeats: int = 0
    frames_seen: int = 0
    flagged: int = 0
    uploaded: int = 0
    evicted: int = 0
    upload_failures: int = 0
    health_failures: int = 0
    human_compared: int = 0
    human_disagreed: int = 0
    challenger_compared: int = 0
    challenger_agreed: int = 0
    ota_failures: int = 0

    def validate(self) -> None:
        for name in FIELD_COUNTERS:
            check_int(getattr(self, name), name, lo=0)


FIELD_COUNTERS: tuple[str, ...] = tuple(f.name for f in fields(FieldCounts))


@dataclass(kw_only=True)
class FieldMetrics(FieldCounts):
    """:class:`FieldCounts` of one version in one scope (``all``, or a rollout's id) and the rates derived
    from them (None until something was compared)."""

    version: str
    scope: str = "all"
    disagreement: float | None = None  # human_disagreed / human_compared
    trigger_rate: float | None = None  # flagged / frames_seen
    challenger_agreement: float | None = None  # challenger_agreed / challenger_compared

    def validate(self) -> None:
        super().validate()
        check_name(self.version, "version")
        check_str(self.scope, "scope", max_len=64)
        for name in ("disagreement", "trigger_rate", "challenger_agreement"):
            opt(getattr(self, name), check_fraction, name)


@dataclass
class RolloutCreate(Message):
    """Roll ``version`` out over ``stages`` (increasing fractions of the fleet, ending where you like, at
    most 1.0); each stage is held ``stage_seconds`` (None: until advanced by a request)."""

    version: str
    stages: list[float] = field(default_factory=lambda: [0.1, 0.5, 1.0])
    stage_seconds: float | None = None
    group: str | None = None  # one device group's rollout (stages are fractions of its devices); None: the fleet
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.version, "version")
        opt(self.group, check_name, "group")
        check_stages(self.stages)
        if self.stage_seconds is not None and check_finite(self.stage_seconds, "stage_seconds") <= 0:
            raise ProtocolError(f"stage_seconds must be > 0 (or null: advance by request); "
                                f"received {self.stage_seconds}")


@dataclass
class RolloutPublic(Message):
    """A rollout: where it stands, why, and the field metrics of its candidate and incumbent (by version)."""

    MAPS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {"metrics": (FieldMetrics, 2)}

    rollout_id: str
    kind: str
    version: str
    state: str
    stages: list[float]
    stage: int  # the index of the current stage in stages
    fraction: float  # stages[stage]
    created_at: float
    stage_started_at: float
    incumbent: str | None = None
    stage_seconds: float | None = None
    finished_at: float | None = None
    reason: str | None = None
    metrics: dict[str, FieldMetrics] = field(default_factory=dict)
    group: str | None = None  # the device group it is aimed at; None: the fleet
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.rollout_id, "rollout_id")
        check_one_of(self.kind, ROLLOUT_KINDS, "kind")
        check_name(self.version, "version")
        check_one_of(self.state, ROLLOUT_STATES, "state")
        check_stages(self.stages)
        check_int(self.stage, "stage", lo=0, hi=len(self.stages) - 1)
        check_fraction(self.fraction, "fraction")
        for name in ("created_at", "stage_started_at"):
            check_finite(getattr(self, name), name)
        opt(self.incumbent, check_name, "incumbent")
        opt(self.stage_seconds, check_finite, "stage_seconds")
        opt(self.finished_at, check_finite, "finished_at")
        opt(self.reason, check_str, "reason", max_len=20_000)
        opt(self.group, check_name, "group")


@dataclass
class GroupPublic(Message):
    """A device group: its enrolled devices, the model they run outside a rollout (``pinned``: its own, set by a
    completed rollout on the group; else the fleet's active model), and the rollout that decides it now."""

    group: str
    devices: int
    model: str | None = None
    pinned: bool = False
    previous: str | None = None  # what the group ran before its pinned model
    rollout_id: str | None = None
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.group, "group")
        check_int(self.devices, "devices", lo=0, hi=10**12)
        opt(self.model, check_name, "model")
        opt(self.previous, check_name, "previous")
        opt(self.rollout_id, check_name, "rollout_id")


@dataclass
class GroupList(Message):
    """Every device group that has devices, a model of its own or a rollout, by name."""

    LISTS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {"groups": (GroupPublic, 1_000_000)}

    groups: list[GroupPublic]
    schema: int = SCHEMA_VERSION


@dataclass
class RolloutList(Message):
    """Every rollout, newest first."""

    LISTS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {"rollouts": (RolloutPublic, 1_000_000)}

    rollouts: list[RolloutPublic]
    schema: int = SCHEMA_VERSION


@dataclass
class Promotion(ModelPublic):
    """The promoted version as it stands, and the rollout the promotion started (None: active at once)."""

    PARTS: ClassVar[dict[str, type[Message] | str]] = {"rollout": RolloutPublic}

    rollout: RolloutPublic | None = None


# ---------------------------------------------------------------------------------------------
# checks shared by these messages
# ---------------------------------------------------------------------------------------------


def check_reason(value: Any, what: str) -> str:
    return check_str(value, what, max_len=MAX_REASON)


def check_stages(value: Any) -> list[float]:
    """Rollout stages: 1-20 increasing fractions of the fleet in (0, 1]."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_STAGES:
        raise ProtocolError(f"stages must be a list of 1-{MAX_STAGES} fractions of the fleet; received "
                            f"{value!r:.80}")
    stages = [check_finite(s, f"stages[{i}]") for i, s in enumerate(value)]
    if any(not 0.0 < s <= 1.0 for s in stages) or any(b <= a for a, b in zip(stages, stages[1:], strict=False)):
        raise ProtocolError(f"stages must be increasing fractions in (0, 1], like [0.1, 0.5, 1.0]; "
                            f"received {stages!r:.80}")
    return stages


SHADOW_STATES = ("running", "done", "promoted", "cancelled")


@dataclass
class ShadowCreate(Message):
    """Run ``version`` in shadow, as the challenger beside each device's active model, on the devices of
    ``group`` until they have compared ``frames`` frames (fleet.hub.shadows)."""

    version: str
    group: str = "default"
    frames: int = 1000
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.version, "version")
        check_name(self.group, "group")
        check_int(self.frames, "frames", lo=1, hi=10**9)


@dataclass
class ShadowPublic(Message):
    """A shadow trial: where it stands, and the field agreement of its candidate with the active model so far
    (``compared`` frames, of which ``agreed``; ``devices`` that reported)."""

    trial_id: str
    version: str
    group: str
    frames: int
    state: str
    created_at: float
    incumbent: str | None = None
    compared: int = 0
    agreed: int = 0
    agreement: float | None = None
    devices: int = 0
    ended_at: float | None = None
    rollout_id: str | None = None
    reason: str | None = None
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.trial_id, "trial_id")
        check_name(self.version, "version")
        check_name(self.group, "group")
        check_int(self.frames, "frames", lo=1)
        check_one_of(self.state, SHADOW_STATES, "state")
        check_finite(self.created_at, "created_at")
        for name in ("compared", "agreed", "devices"):
            check_int(getattr(self, name), name, lo=0)
        opt(self.agreement, check_fraction, "agreement")
        opt(self.rollout_id, check_name, "rollout_id")


@dataclass
class ShadowList(Message):
    LISTS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {"trials": (ShadowPublic, 100_000)}

    trials: list[ShadowPublic]
    schema: int = SCHEMA_VERSION


@dataclass
class ShadowPromote(Message):
    """Promote a shadow trial's candidate to a canary: a staged rollout over ``stages``."""

    stages: list[float] = field(default_factory=lambda: [0.1, 0.5, 1.0])
    stage_seconds: float | None = None
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_stages(self.stages)
        if self.stage_seconds is not None and check_finite(self.stage_seconds, "stage_seconds") <= 0:
            raise ProtocolError(f"stage_seconds must be > 0 (or null); received {self.stage_seconds}")
