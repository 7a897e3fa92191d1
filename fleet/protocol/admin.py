"""Admin messages: devices and their revocation, API tokens, enrollment grants and the enrollment audit, and
what the hub says about itself (health, the summary). The model registry's messages are in
:mod:`fleet.protocol.registry`.

==============================================  ================================================================
``GET  /v1/devices?limit=&offset=&q=``         -> :class:`DeviceList`
``POST /v1/devices/{device_id}/revoke``         -> :class:`DeviceRevoked`
``POST /v1/devices/{device_id}/enrollment-token``  :class:`GrantCreate` -> :class:`Grant`
``GET  /v1/enrollment-attempts``                -> :class:`EnrollmentAttemptList`
``POST /v1/tokens``                             :class:`TokenCreate` -> :class:`TokenIssued`
``GET  /v1/tokens``                             -> :class:`TokenList`
``DELETE /v1/tokens/{name}``                    -> :class:`TokenPublic`
``GET  /healthz``                               -> :class:`Health`
``GET  /v1/summary``                            -> :class:`Summary`
``GET  /metrics``                               -> Prometheus text
==============================================  ================================================================
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from fleet.errors import ProtocolError
from fleet.protocol.base import (
    SCHEMA_VERSION,
    Message,
    check_bool,
    check_finite,
    check_fraction,
    check_int,
    check_name,
    check_number_map,
    check_one_of,
    check_str,
    opt,
)
from fleet.protocol.registry import MODEL_STATUSES, FieldCounts, RolloutPublic

SCOPES = ("device", "admin", "labeler", "trainer")
ISSUED_SCOPES = ("admin", "labeler", "trainer")  # what POST /v1/tokens makes; device tokens come from enrollment
ENROLL_OUTCOMES = ("enrolled", "re-enrolled", "refused")
ENROLL_METHODS = ("fleet-secret", "enrollment-token", "device-token", "admin", "")
MAX_GRANT_TTL_S = 366 * 24 * 3600.0
MAX_DEVICES_PAGE = 10_000  # devices one DeviceList holds at most (GET /v1/devices?limit=)

# ---------------------------------------------------------------------------------------------
# devices and enrollment
# ---------------------------------------------------------------------------------------------


@dataclass
class DevicePublic(Message):
    """An enrolled device: its group, when it enrolled and was last heard from, and what it last ran; its spool
    as its last heartbeat said, and the evictions and comparisons with the human summed over its boots."""

    device_id: str
    group: str
    enrolled_at: float
    revoked_at: float | None = None
    last_seen_at: float | None = None
    model_version: str | None = None  # as its last heartbeat said
    boot_id: str | None = None
    spool_bytes: int | None = None
    spool_items: int | None = None
    evicted: int = 0
    human_compared: int = 0
    human_disagreed: int = 0
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.device_id, "device_id")
        check_name(self.group, "group")
        check_finite(self.enrolled_at, "enrolled_at")
        opt(self.revoked_at, check_finite, "revoked_at")
        opt(self.last_seen_at, check_finite, "last_seen_at")
        opt(self.model_version, check_name, "model_version")
        opt(self.boot_id, check_name, "boot_id")
        opt(self.spool_bytes, check_int, "spool_bytes", lo=0)
        opt(self.spool_items, check_int, "spool_items", lo=0)
        for name in ("evicted", "human_compared", "human_disagreed"):
            check_int(getattr(self, name), name, lo=0)

    @property
    def disagreement(self) -> float | None:
        """The share of compared frames where the model's top-1 differed from the human's action."""
        return self.human_disagreed / self.human_compared if self.human_compared else None


@dataclass
class DeviceList(Message):
    """A page of the enrolled devices, by id, and ``total``: how many devices match the request in all (every
    enrolled device, or those its search holds), so a client asks for the next page until it has them."""

    LISTS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {"devices": (DevicePublic, MAX_DEVICES_PAGE)}

    devices: list[DevicePublic]
    total: int
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_int(self.total, "total", lo=len(self.devices))


@dataclass
class DeviceRevoked(Message):
    """A device revoked: it never enrolls again, and its tokens stop working."""

    device_id: str
    revoked_at: float
    tokens_revoked: int
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.device_id, "device_id")
        check_finite(self.revoked_at, "revoked_at")
        check_int(self.tokens_revoked, "tokens_revoked", lo=0)


@dataclass
class GrantCreate(Message):
    """Ask for a one-time enrollment token for one device id, into ``group`` (default: what the device
    asks for), living ``ttl_s`` seconds (default: the hub's ``enrollment_token_ttl_s``)."""

    group: str | None = None
    ttl_s: float | None = None
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        opt(self.group, check_name, "group")
        if self.ttl_s is not None and not 0 < check_finite(self.ttl_s, "ttl_s") <= MAX_GRANT_TTL_S:
            raise ProtocolError(f"ttl_s must be in (0, {MAX_GRANT_TTL_S:.0f}] seconds (a year at most); "
                                f"received {self.ttl_s}")


@dataclass
class Grant(Message):
    """A one-time enrollment token (shown once; the hub keeps its hash)."""

    device_id: str
    enrollment_token: str
    expires_at: float
    group: str | None = None
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.device_id, "device_id")
        check_str(self.enrollment_token, "enrollment_token", max_len=512)
        check_finite(self.expires_at, "expires_at")
        opt(self.group, check_name, "group")


@dataclass
class EnrollmentAttemptPublic(Message):
    """One row of the enrollment audit: who (``client``) enrolled which device how, or was refused why."""

    id: int
    at: float
    client: str
    outcome: str
    device_id: str | None = None
    method: str = ""
    detail: str = ""
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_int(self.id, "id", lo=0)
        check_finite(self.at, "at")
        check_str(self.client, "client", max_len=64)
        check_one_of(self.outcome, ENROLL_OUTCOMES, "outcome")
        opt(self.device_id, check_str, "device_id", max_len=128)  # a refused attempt may name anything
        check_one_of(self.method, ENROLL_METHODS, "method")
        check_str(self.detail, "detail", max_len=2000)


@dataclass
class EnrollmentAttemptList(Message):
    """The enrollment audit, newest first."""

    LISTS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {"attempts": (EnrollmentAttemptPublic, 1000)}

    attempts: list[EnrollmentAttemptPublic]
    schema: int = SCHEMA_VERSION


# ---------------------------------------------------------------------------------------------
# API tokens
# ---------------------------------------------------------------------------------------------


@dataclass
class TokenCreate(Message):
    """Create an API token of ``scope`` (admin, labeler or trainer) under a unique ``name``."""

    scope: str
    name: str
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_one_of(self.scope, ISSUED_SCOPES, "scope")
        check_name(self.name, "token name")


@dataclass
class TokenIssued(Message):
    """A new token: ``token`` is shown this once (the hub keeps its hash)."""

    name: str
    scope: str
    token: str
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.name, "token name")
        check_one_of(self.scope, ISSUED_SCOPES, "scope")
        check_str(self.token, "token", max_len=512)


@dataclass
class TokenPublic(Message):
    """A token as listed: its name, scope and life (never the token itself)."""

    name: str
    scope: str
    created_at: float
    revoked_at: float | None = None
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_str(self.name, "token name", max_len=128)
        check_one_of(self.scope, SCOPES, "scope")
        check_finite(self.created_at, "created_at")
        opt(self.revoked_at, check_finite, "revoked_at")


@dataclass
class TokenList(Message):
    """The admin, labeler and trainer tokens, by name (device tokens are each device's business)."""

    LISTS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {"tokens": (TokenPublic, 1_000_000)}

    tokens: list[TokenPublic]
    schema: int = SCHEMA_VERSION


# ---------------------------------------------------------------------------------------------
# the hub about itself
# ---------------------------------------------------------------------------------------------


@dataclass
class Health(Message):
    """The hub answers and its database is reachable (``database``: the dialect); ``time``: the hub's clock."""

    ok: bool
    database: str
    time: float
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_bool(self.ok, "ok")
        check_str(self.database, "database", max_len=64)
        check_finite(self.time, "time")


@dataclass
class ModelSummary(Message):
    """One model version's figures: cases reported from it, labels, accuracy on the labeled ones, and the
    field metrics its devices reported (over every device that ran it)."""

    VERSIONED: ClassVar[bool] = False
    PARTS: ClassVar[dict[str, type[Message] | str]] = {"field": FieldCounts}

    status: str  # a model status, or "unknown" for a version only cases name
    cases: int
    labels: int
    field: FieldCounts
    parent_version: str | None = None
    accuracy: float | None = None
    field_disagreement: float | None = None
    trigger_rate: float | None = None
    challenger_agreement: float | None = None
    health_failures: int = 0
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # from its manifest ('field' is taken)

    def validate(self) -> None:
        check_one_of(self.status, (*MODEL_STATUSES, "unknown"), "status")
        check_int(self.cases, "cases", lo=0)
        check_int(self.labels, "labels", lo=0)
        self.field.validate()
        opt(self.parent_version, check_name, "parent_version")
        for name in ("accuracy", "field_disagreement", "trigger_rate", "challenger_agreement"):
            opt(getattr(self, name), check_fraction, name)
        check_int(self.health_failures, "health_failures", lo=0)
        check_number_map(self.metrics, "metrics")


@dataclass
class QueueDepths(Message):
    """How many cases are in each state, and Label Studio events not yet acknowledged by the bridge."""

    VERSIONED: ClassVar[bool] = False

    unlabeled: int = 0
    queued: int = 0
    labeled: int = 0
    held: int = 0
    duplicate: int = 0
    webhook_events_pending: int = 0

    def validate(self) -> None:
        for name in ("unlabeled", "queued", "labeled", "held", "duplicate", "webhook_events_pending"):
            check_int(getattr(self, name), name, lo=0)


@dataclass
class Summary(Message):
    """The loop at a glance: per model version, the queues, totals, the active model and the running rollout."""

    MAPS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {"models": (ModelSummary, 1_000_000)}
    PARTS: ClassVar[dict[str, type[Message] | str]] = {"queues": QueueDepths, "rollout": RolloutPublic}

    models: dict[str, ModelSummary]
    queues: QueueDepths
    cases_total: int
    labels_total: int
    devices: int
    active_model: str | None = None
    rollout: RolloutPublic | None = None
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        for name in ("cases_total", "labels_total", "devices"):
            check_int(getattr(self, name), name, lo=0)
        opt(self.active_model, check_name, "active_model")
