"""The hub's SQLModel tables (what crosses the wire is fleet.protocol's messages, built from these rows).

Times are unix seconds (float). JSON columns hold lists and objects as sent on the wire. Every table
here is created by the Alembic revisions in ``fleet/hub/migrations``; a test checks they agree.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel


def _json(**kw: Any) -> Any:
    return Field(default_factory=dict, sa_column=sa.Column(sa.JSON, nullable=False), **kw)


def _json_list(**kw: Any) -> Any:
    return Field(default_factory=list, sa_column=sa.Column(sa.JSON, nullable=False), **kw)


def _id(length: int = 128, **kw: Any) -> Any:
    return Field(sa_type=sa.String(length), **kw)  # type: ignore[call-overload]


# ---------------------------------------------------------------------------------------------
# devices and tokens
# ---------------------------------------------------------------------------------------------


class Device(SQLModel, table=True):
    __tablename__ = "devices"

    device_id: str = _id(primary_key=True)
    group: str = _id(default="default", index=True)
    enrolled_at: float
    revoked_at: float | None = None
    last_seen_at: float | None = None
    model_version: str | None = _id(default=None)
    boot_id: str | None = _id(default=None)
    spool_bytes: int | None = Field(default=None, sa_type=sa.BigInteger)  # type: ignore[call-overload]
    spool_items: int | None = Field(default=None, sa_type=sa.BigInteger)  # type: ignore[call-overload]


class ApiToken(SQLModel, table=True):
    __tablename__ = "tokens"

    id: int | None = Field(default=None, primary_key=True)
    name: str = _id(unique=True)
    scope: str = _id(32)
    token_hash: str = _id(64, unique=True)
    device_id: str | None = _id(default=None, index=True)
    created_at: float
    revoked_at: float | None = None


class EnrollmentGrant(SQLModel, table=True):
    """A one-time, expiring enrollment token an admin issued for one device id (stored as sha256)."""

    __tablename__ = "enrollment_grants"

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = _id(index=True)
    token_hash: str = _id(64, unique=True)
    group: str | None = _id(default=None)
    created_at: float
    expires_at: float
    used_at: float | None = None
    created_by: str = _id(default="")


class EnrollmentAttempt(SQLModel, table=True):
    """The audit of enrollments: every success and every refusal, with the caller's address."""

    __tablename__ = "enrollment_attempts"
    __table_args__ = (sa.Index("ix_enrollment_attempts_client_at", "client", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    at: float = Field(index=True)
    client: str = _id(64)
    device_id: str | None = _id(default=None, index=True)
    outcome: str = _id(32)  # enrolled | re-enrolled | refused
    method: str = _id(32, default="")  # fleet-secret | device-token | admin | enrollment-token | ""
    detail: str = Field(default="", sa_type=sa.Text)  # type: ignore[call-overload]


# ---------------------------------------------------------------------------------------------
# cases, blobs, labels, selections, snapshots
# ---------------------------------------------------------------------------------------------


class Blob(SQLModel, table=True):
    __tablename__ = "blobs"

    sha256: str = _id(64, primary_key=True)
    size: int
    kind: str = _id(16, default="image")  # image | model | manifest | bank
    created_at: float


class CaseRow(SQLModel, table=True):
    """A case: the :class:`~fleet.protocol.Case` the device sent (``payload``, without its embedding, which is
    kept compactly beside it), and the columns the hub selects, counts and joins on."""

    __tablename__ = "cases"
    __table_args__ = (
        sa.Index("ix_cases_state_uncertainty", "state", "uncertainty"),
        sa.Index("ix_cases_model_version", "model_version"),
    )

    case_id: str = _id(primary_key=True)
    device_id: str = _id(index=True)
    captured_at: float
    received_at: float
    model_version: str = _id()
    task: str = Field(default="classify", sa_type=sa.String(16),  # type: ignore[call-overload]
                      sa_column_kwargs={"server_default": "classify"})
    predicted_class: int | None = None  # the top class of a ``classify`` prediction, for field metrics
    uncertainty: float  # informativeness in [0, 1]; higher = label first
    priority: float = 0.0
    campaign_id: str | None = _id(default=None)
    campaign_version: int | None = None
    payload: dict[str, Any] = _json()
    embedding: bytes | None = Field(default=None, sa_column=sa.Column(sa.LargeBinary, nullable=True))
    embedding_dim: int | None = None
    image_sha256: str = _id(64, index=True)
    image_size: int
    duplicate_of: str | None = _id(default=None)
    state: str = _id(16, default="unlabeled")
    selection_id: str | None = _id(default=None, index=True)
    label: int | None = None  # the consensus class of a ``classify`` case
    label_payload: dict[str, Any] | None = Field(default=None, sa_column=sa.Column(sa.JSON(none_as_null=True),
                                                                                   nullable=True))
    label_status: str | None = _id(16, default=None)


class CaseScore(SQLModel, table=True):
    """A case re-scored by a model other than the one that captured it (:mod:`fleet.hub.rescore`): its
    informativeness and embedding in that model's space. A case's own model's scores are the ``cases`` row's;
    ``error`` says why a case could not be re-scored (its scores are then null and it is not tried again)."""

    __tablename__ = "case_scores"
    __table_args__ = (sa.Index("ix_case_scores_version_uncertainty", "model_version", "uncertainty"),)

    case_id: str = _id(primary_key=True)
    model_version: str = _id(primary_key=True)
    uncertainty: float | None = None
    predicted_class: int | None = None
    embedding: bytes | None = Field(default=None, sa_column=sa.Column(sa.LargeBinary, nullable=True))
    embedding_dim: int | None = None
    probs: bytes | None = Field(default=None, sa_column=sa.Column(sa.LargeBinary, nullable=True))  # float32, classify
    scored_at: float
    error: str | None = _id(512, default=None)


class LabelRow(SQLModel, table=True):
    """One annotator's answer on one case as it was posted, and the hub's verdict on it (fleet.consensus)."""

    __tablename__ = "labels"
    __table_args__ = (sa.UniqueConstraint("source", "annotation_id", name="uq_labels_source_annotation"),)

    id: int | None = Field(default=None, primary_key=True)
    case_id: str = _id(index=True)
    label: int | None = None  # the class of a ``classify`` answer
    payload: dict[str, Any] = _json()  # the answer (a Prediction without scores)
    annotator: str = _id(256, index=True)
    source: str = _id(64)
    task_id: int = Field(sa_type=sa.BigInteger)  # type: ignore[call-overload]
    annotation_id: int = Field(sa_type=sa.BigInteger)  # type: ignore[call-overload]
    created_at: float
    updated_at: float
    overlap: int = Field(default=1, sa_column_kwargs={"server_default": "1"})
    ground_truth: bool = Field(default=False, sa_column_kwargs={"server_default": sa.false()})
    gold_payload: dict[str, Any] | None = Field(default=None, sa_column=sa.Column(sa.JSON(none_as_null=True),
                                                                                  nullable=True))
    agreement: float | None = None
    n_annotators: int | None = None
    status: str = _id(16, default="held")
    reason: str = Field(default="", sa_type=sa.Text,  # type: ignore[call-overload]
                        sa_column_kwargs={"server_default": ""})


class Selection(SQLModel, table=True):
    __tablename__ = "selections"

    selection_id: str = _id(64, primary_key=True)
    strategy: str = _id(64)
    budget: int
    n_selected: int
    created_at: float
    case_ids: list[str] = _json_list()


class Snapshot(SQLModel, table=True):
    __tablename__ = "snapshots"

    snapshot_id: str = _id(64, primary_key=True)
    version: int = Field(unique=True)
    name: str | None = _id(default=None)
    created_at: float
    n_labels: int
    manifest_sha256: str = _id(64)


# ---------------------------------------------------------------------------------------------
# models, rollouts, field metrics
# ---------------------------------------------------------------------------------------------


class ModelVersion(SQLModel, table=True):
    __tablename__ = "model_versions"

    version: str = _id(primary_key=True)
    parent_version: str | None = _id(default=None)
    status: str = _id(16, default="candidate")
    onnx_sha256: str = _id(64)
    onnx_size: int = Field(sa_type=sa.BigInteger)  # type: ignore[call-overload]
    signed_manifest: dict[str, Any] = _json()
    class_names: list[str] = _json_list()
    embedding_dim: int
    metrics: dict[str, float] = _json()
    created_at: float  # from the manifest
    uploaded_at: float
    status_changed_at: float
    activated_at: float | None = None  # last time it became active (added by revision 0002)


class Rollout(SQLModel, table=True):
    __tablename__ = "rollouts"

    rollout_id: str = _id(64, primary_key=True)
    version: str = _id(index=True)
    incumbent: str | None = _id(default=None)
    stages: list[float] = _json_list()
    stage_index: int = 0
    stage_seconds: float | None = None
    state: str = _id(16, default="running", index=True)
    kind: str = Field(default="staged", sa_type=sa.String(16),  # type: ignore[call-overload]
                      sa_column_kwargs={"server_default": "staged"})  # staged | promotion | override
    reason: str | None = Field(default=None, sa_type=sa.Text)  # type: ignore[call-overload]
    created_at: float
    stage_started_at: float
    finished_at: float | None = None
    group: str | None = _id(default=None, index=True)  # the device group it is aimed at; None: the fleet


class GroupModel(SQLModel, table=True):
    """A device group's own model (fleet.hub.rollouts): its devices run ``version`` instead of the fleet's
    active model and stay out of fleet-wide rollouts. Set when a rollout on the group completes."""

    __tablename__ = "group_models"

    group: str = _id(primary_key=True)
    version: str = _id()
    previous: str | None = _id(default=None)  # what the group ran before (the rollout's incumbent)
    rollout_id: str | None = _id(64, default=None)
    set_at: float


class ShadowTrial(SQLModel, table=True):
    """An operator's shadow trial (fleet.hub.shadows): ``version`` as the challenger on ``group`` for ``frames``."""

    __tablename__ = "shadow_trials"

    trial_id: str = _id(primary_key=True)
    version: str = _id()
    group: str = _id(index=True)
    frames: int = Field(sa_type=sa.BigInteger)  # type: ignore[call-overload]
    state: str = _id(16, default="running")
    incumbent: str | None = _id(default=None)
    created_at: float
    ended_at: float | None = None
    rollout_id: str | None = _id(default=None)
    reason: str | None = Field(default=None, sa_type=sa.Text)  # type: ignore[call-overload]


class HeartbeatState(SQLModel, table=True):
    """The last cumulative counters seen per (device, boot): heartbeat deltas are taken against it."""

    __tablename__ = "heartbeat_states"

    device_id: str = _id(primary_key=True)
    boot_id: str = _id(primary_key=True)
    model_version: str | None = _id(default=None)
    challenger_version: str | None = _id(default=None)
    values: dict[str, int] = _json()
    sent_at: float
    received_at: float


class FieldMetric(SQLModel, table=True):
    """Summed heartbeat deltas per model version, overall (scope "all") and per rollout (its id)."""

    __tablename__ = "field_metrics"

    scope: str = _id(64, primary_key=True)
    version: str = _id(primary_key=True)
    heartbeats: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]
    frames_seen: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]
    flagged: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]
    uploaded: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]
    evicted: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]
    upload_failures: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]
    health_failures: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]
    human_compared: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]
    human_disagreed: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]
    challenger_compared: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]
    challenger_agreed: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]
    ota_failures: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]


class RolloutDeviceMetric(SQLModel, table=True):
    """Per device, what a rollout's metrics were made of: a rollback needs evidence from several devices."""

    __tablename__ = "rollout_device_metrics"

    rollout_id: str = _id(64, primary_key=True)
    version: str = _id(primary_key=True)
    device_id: str = _id(primary_key=True)
    heartbeats: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]
    health_failures: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]
    ota_failures: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]
    human_compared: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]
    human_disagreed: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]
    challenger_compared: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]  # 0007
    challenger_agreed: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]


class OtaReportRow(SQLModel, table=True):
    __tablename__ = "ota_reports"

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = _id(index=True)
    version: str = _id(index=True)
    outcome: str = _id(16)
    reason: str = Field(default="", sa_type=sa.Text)  # type: ignore[call-overload]
    previous_version: str | None = _id(default=None)
    reported_at: float
    received_at: float


# ---------------------------------------------------------------------------------------------
# campaigns, novelty banks, labeling inbox, small state
# ---------------------------------------------------------------------------------------------


class Campaign(SQLModel, table=True):
    __tablename__ = "campaigns"

    campaign_id: str = _id(primary_key=True)
    version: int = Field(primary_key=True)
    spec: dict[str, Any] = _json()
    groups: list[str] = _json_list()  # empty = every group
    expires_at: float | None = None
    novelty_bank: str | None = _id(default=None)
    created_at: float
    deleted_at: float | None = None
    auto_budgets: bool = Field(default=False, sa_column_kwargs={"server_default": sa.false()})  # fleet.hub.autobudget
    learned_for: str | None = _id(default=None)  # the model the spec's learned leaf was fitted for (fleet.hub.learned)
    learned_rate: float | None = None  # the learned leaf's target rate: refitted for each new active model
    # the learned leaves fitted for the other models the campaign's devices run (model version -> leaf), each sent
    # in place of the spec's own to the devices running that model (fleet.hub.learned.spec_for_model)
    learned_leaves: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(sa.JSON, nullable=False,
                                                                                       server_default="{}"))


class CampaignRefusalRow(SQLModel, table=True):
    """A device that could not run a campaign version (``POST /v1/campaign-refusals``): its last reason, and how
    many times it refused (again after each restart of its agent)."""

    __tablename__ = "campaign_refusals"

    campaign_id: str = _id(primary_key=True)
    version: int = Field(primary_key=True)
    device_id: str = _id(primary_key=True)
    reason: str = Field(default="", sa_type=sa.Text)  # type: ignore[call-overload]
    refused_at: float  # the device's clock
    received_at: float
    times: int = Field(default=1)


class UploadBucket(SQLModel, table=True):
    """A token bucket every hub worker draws on (fleet.hub.quota): the fleet's uploads, or one campaign's."""

    __tablename__ = "upload_buckets"

    key: str = _id(primary_key=True)  # "fleet" or "campaign:<id>"
    tokens: float
    updated_at: float


class KeyRotationRow(SQLModel, table=True):
    """A fleet key rotation an admin posted (fleet.hub.keys): the new key, announced under a trusted one."""

    __tablename__ = "key_rotations"

    seq: int | None = Field(default=None, primary_key=True)
    new_key_id: str = _id(64, unique=True)
    payload: dict[str, Any] = _json()  # the KeyRotation as posted
    created_at: float


class PredictionCount(SQLModel, table=True):
    """Frames a model version predicted as ``label`` (a class index, or ``none``), from heartbeats: summed over the
    fleet (``scope`` ``all``, ``device_id`` ``*``) and per device within a rollout (``scope`` its id), for rule 5 of
    fleet.hub.evidence."""

    __tablename__ = "prediction_counts"

    scope: str = _id(primary_key=True)
    version: str = _id(primary_key=True)
    device_id: str = _id(primary_key=True)
    label: str = _id(16, primary_key=True)
    count: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]


class NoveltyBankRow(SQLModel, table=True):
    __tablename__ = "novelty_banks"

    bank_id: str = _id(primary_key=True)
    sha256: str = _id(64)
    size: int
    n: int
    dim: int
    model_version: str | None = _id(default=None)
    created_at: float


class WebhookEvent(SQLModel, table=True):
    __tablename__ = "webhook_events"

    id: int | None = Field(default=None, primary_key=True)
    body_sha256: str = _id(64, unique=True)
    body: str = Field(sa_type=sa.Text)  # type: ignore[call-overload]
    received_at: float


class HubState(SQLModel, table=True):
    __tablename__ = "hub_state"

    key: str = _id(64, primary_key=True)
    value: str = Field(sa_type=sa.Text)  # type: ignore[call-overload]
