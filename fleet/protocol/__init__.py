"""The wire contract between edge agents, the hub, the labeling bridge and the trainer: one type per message.

Plain dataclasses with ``to_json``/``from_json`` (no pydantic: this runs on devices), used on both sides of
every seam: the hub validates requests with them and builds its responses from them, and every client
parses with them. Each top-level message carries ``schema`` so a peer refuses a version it does not speak.

- :mod:`fleet.protocol.base`: the shared machinery and field checks.
- :mod:`fleet.protocol.tasks`: predictions, labels and human actions by task (``classify``, ...).
- :mod:`fleet.protocol.device`: enrollment, cases, assignments, heartbeats, OTA reports.
- :mod:`fleet.protocol.model`: input specs and signed model manifests.
- :mod:`fleet.protocol.labeling`: selections, the pool, labels and the webhook inbox.
- :mod:`fleet.protocol.dataset`: snapshots for the trainer.
- :mod:`fleet.protocol.registry`: the model registry, rollouts and their field metrics.
- :mod:`fleet.protocol.lineage`: what a model was trained on, and what a case's label influenced.
- :mod:`fleet.protocol.campaigns`: campaigns and novelty banks.
- :mod:`fleet.protocol.admin`: devices, API tokens, enrollment grants and audit, the hub's health and summary.
"""

from fleet.protocol.admin import (
    ENROLL_OUTCOMES,
    ISSUED_SCOPES,
    MAX_DEVICES_PAGE,
    SCOPES,
    DeviceList,
    DevicePublic,
    DeviceRevoked,
    EnrollmentAttemptList,
    EnrollmentAttemptPublic,
    Grant,
    GrantCreate,
    Health,
    ModelSummary,
    QueueDepths,
    Summary,
    TokenCreate,
    TokenIssued,
    TokenList,
    TokenPublic,
)
from fleet.protocol.base import (
    DB_INT,
    MAX_INT,
    NAME_RE,
    SCHEMA_VERSION,
    SHA256_RE,
    Message,
    canonical_json,
    check_finite,
    check_int,
    check_name,
    check_sha256,
    check_str,
    check_tags,
    decode_embedding,
    encode_embedding,
    fit_tags,
)
from fleet.protocol.campaigns import (
    BankCreate,
    BankList,
    BankPublic,
    CampaignCreate,
    CampaignDeleted,
    CampaignList,
    CampaignPublic,
    CampaignReceipt,
    CampaignRefusal,
    CampaignRefusals,
    CampaignVersions,
    DeviceRefusal,
    LearnedFit,
    TriggerYield,
    YieldReport,
)
from fleet.protocol.dataset import (
    BlobRequest,
    SnapshotCreate,
    SnapshotEntry,
    SnapshotHeader,
    SnapshotList,
    SnapshotPublic,
    decode_manifest,
    encode_manifest,
)
from fleet.protocol.device import (
    CASE_STATUSES,
    HEARTBEAT_COUNTERS,
    OTA_OUTCOMES,
    Assignment,
    BatchReceipt,
    CampaignRef,
    Case,
    CaseReceipt,
    ChallengerOutput,
    Enrollment,
    EnrollRequest,
    Heartbeat,
    KeyRotation,
    KeyRotationList,
    ModelRef,
    OtaReport,
    TriggerHit,
)
from fleet.protocol.labeling import (
    CASE_STATES,
    LABEL_STATUSES,
    STRATEGIES,
    Ack,
    EventPage,
    LabelPage,
    LabelPost,
    LabelPublic,
    LabelReceipt,
    PoolPage,
    Release,
    SelectedCase,
    Selection,
    SelectionRequest,
    StoredEvent,
    Verdict,
    check_balance,
)
from fleet.protocol.lineage import CaseInfluence, DeviceContribution, LineageEntry, ModelLineage
from fleet.protocol.model import OUTPUTS, DetectorSpec, InputSpec, ModelManifest, SignedManifest
from fleet.protocol.registry import (
    FIELD_COUNTERS,
    MODEL_STATUSES,
    ROLLOUT_KINDS,
    ROLLOUT_STATES,
    FieldCounts,
    FieldMetrics,
    GroupList,
    GroupPublic,
    ModelList,
    ModelPublic,
    ModelReceipt,
    PromoteRequest,
    Promotion,
    RescoreProgress,
    RescoreRequest,
    RollbackReceipt,
    RollbackRequest,
    RolloutCreate,
    RolloutList,
    RolloutPublic,
    ShadowCreate,
    ShadowList,
    ShadowPromote,
    ShadowPublic,
)
from fleet.protocol.tasks import (
    MAX_BOXES,
    TASK_TYPES,
    TASKS,
    Box,
    Classification,
    Detection,
    Prediction,
    parse_prediction,
)

__all__ = [
    "CASE_STATES", "CASE_STATUSES", "DB_INT", "ENROLL_OUTCOMES", "FIELD_COUNTERS", "HEARTBEAT_COUNTERS",
    "ISSUED_SCOPES", "LABEL_STATUSES", "MAX_BOXES", "MAX_DEVICES_PAGE", "MAX_INT", "MODEL_STATUSES", "NAME_RE",
    "OTA_OUTCOMES",
    "OUTPUTS", "ROLLOUT_KINDS", "ROLLOUT_STATES", "SCHEMA_VERSION", "SCOPES", "SHA256_RE", "STRATEGIES", "TASKS",
    "TASK_TYPES", "Ack", "Assignment", "BankCreate", "BankList", "BankPublic", "BatchReceipt", "BlobRequest", "Box",
    "CampaignCreate", "CampaignDeleted", "CampaignList", "CampaignPublic", "CampaignReceipt", "CampaignRef",
    "CampaignRefusal", "CampaignRefusals", "CampaignVersions", "Case", "CaseInfluence", "CaseReceipt",
    "ChallengerOutput", "Classification", "Detection", "DetectorSpec", "DeviceContribution", "DeviceList",
    "DevicePublic", "DeviceRefusal", "DeviceRevoked", "EnrollRequest",
    "Enrollment", "EnrollmentAttemptList", "EnrollmentAttemptPublic", "EventPage", "FieldCounts", "FieldMetrics",
    "Grant", "GrantCreate", "GroupList", "GroupPublic", "Health", "Heartbeat", "InputSpec", "KeyRotation",
    "KeyRotationList", "LabelPage",
    "LabelPost", "LabelPublic", "LabelReceipt", "LearnedFit", "LineageEntry", "Message", "ModelLineage",
    "ModelList", "ModelManifest",
    "ModelPublic", "ModelReceipt", "ModelRef", "ModelSummary", "OtaReport", "PoolPage", "Prediction",
    "PromoteRequest", "Promotion", "QueueDepths", "Release", "RescoreProgress",
    "RescoreRequest", "RollbackReceipt", "RollbackRequest", "RolloutCreate",
    "RolloutList", "RolloutPublic", "SelectedCase", "Selection", "SelectionRequest", "ShadowCreate", "ShadowList",
    "ShadowPromote", "ShadowPublic", "SignedManifest",
    "SnapshotCreate", "SnapshotEntry", "SnapshotHeader", "SnapshotList", "SnapshotPublic", "StoredEvent", "Summary",
    "TokenCreate", "TokenIssued", "TokenList", "TokenPublic", "TriggerHit", "TriggerYield", "Verdict",
    "YieldReport", "canonical_json", "check_balance", "check_finite", "check_int", "check_name", "check_sha256",
    "check_str", "check_tags", "decode_embedding", "decode_manifest", "encode_embedding", "encode_manifest", "fit_tags",
    "parse_prediction",
]
