"""The library-like modules export exactly their public surface (httpx's exported-members test, per module):
``__all__`` equals the list pinned here, every name in it resolves, and nothing public is left out."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

SURFACES = {
    "fleet.errors": [
        "Conflict", "FlywheelError", "Forbidden", "IntegrityError", "InvalidInput", "MissingExtra", "NotFound",
        "PayloadTooLarge", "PermanentError", "ProtocolError", "RETRYABLE_STATUS", "RequestTimeout", "RetryableError",
        "ServerBusy", "TooManyRequests", "TransportError", "Unauthorized", "UnsupportedMedia", "check_folder",
        "error_for_response", "error_for_status", "headers_for", "parse_retry_after", "require", "response_detail",
        "status_for"],
    "fleet.retry": ["NO_RETRY", "RetryPolicy", "retrying"],
    "fleet.consensus": [
        "AnnotatorScore", "Rules", "Ruling", "STATUSES", "Vote", "box_f1", "decide", "detection_f1", "gold_accuracy",
        "majority_vote", "match_same_class", "merge_boxes", "merge_detections", "pairwise_agreement",
        "score_annotators", "vote_counts"],
    "fleet.consensus_boxes": [
        "box_f1", "check_box_classes", "detection_f1", "match_same_class", "merge_boxes", "merge_detections"],
    "fleet.protocol": [
        "Ack", "Assignment", "BankCreate", "BankList", "BankPublic", "BatchReceipt", "BlobRequest", "Box",
        "CASE_STATES", "CASE_STATUSES", "CampaignCreate", "CampaignDeleted", "CampaignList", "CampaignPublic",
        "CampaignReceipt", "CampaignRef", "CampaignRefusal", "CampaignRefusals", "CampaignVersions", "Case",
        "CaseInfluence", "CaseReceipt",
        "ChallengerOutput", "DeviceContribution", "LineageEntry", "ModelLineage",
        "Classification", "DB_INT", "Detection", "DetectorSpec", "DeviceList", "DevicePublic", "DeviceRefusal",
        "DeviceRevoked",
        "ENROLL_OUTCOMES", "EnrollRequest", "Enrollment", "EnrollmentAttemptList", "EnrollmentAttemptPublic",
        "EventPage", "FIELD_COUNTERS", "FieldCounts", "FieldMetrics", "Grant", "GrantCreate", "GroupList",
        "GroupPublic", "HEARTBEAT_COUNTERS",
        "Health", "Heartbeat", "ISSUED_SCOPES", "InputSpec", "KeyRotation",
        "KeyRotationList", "LABEL_STATUSES", "LabelPage", "LabelPost", "LabelPublic",
        "LabelReceipt", "LearnedFit", "MAX_BOXES", "MAX_DEVICES_PAGE", "MAX_INT", "MODEL_STATUSES", "Message",
        "ModelList",
        "ModelManifest", "ModelPublic", "ModelReceipt", "ModelRef", "ModelSummary", "NAME_RE", "OTA_OUTCOMES",
        "OUTPUTS", "OtaReport", "PoolPage", "Prediction", "PromoteRequest", "Promotion", "QueueDepths",
        "ROLLOUT_KINDS", "ROLLOUT_STATES", "Release", "RescoreProgress", "RescoreRequest", "RollbackReceipt",
        "RollbackRequest", "RolloutCreate",
        "RolloutList", "RolloutPublic", "SCHEMA_VERSION", "SCOPES", "SHA256_RE", "STRATEGIES", "SelectedCase",
        "Selection", "SelectionRequest", "ShadowCreate", "ShadowList",
        "ShadowPromote", "ShadowPublic", "SignedManifest", "SnapshotCreate", "SnapshotEntry", "SnapshotHeader",
        "SnapshotList", "SnapshotPublic", "StoredEvent", "Summary", "TASKS", "TASK_TYPES", "TokenCreate",
        "TokenIssued", "TokenList", "TokenPublic", "TriggerHit", "TriggerYield", "Verdict", "YieldReport",
        "canonical_json", "check_balance", "check_finite", "check_int", "check_name", "check_sha256", "check_str",
        "check_tags",
        "decode_embedding", "decode_manifest", "encode_embedding", "encode_manifest", "fit_tags", "parse_prediction"],
    "fleet.signing": [
        "KeyPair", "KeyRing", "PRIVATE_KEY_ENV", "TrustedKey", "generate_keypair", "key_id", "load_private_key",
        "public_key_b64", "read_keypair", "sign_manifest", "sign_rotation", "verify_file_sha256", "verify_manifest",
        "verify_rotation", "write_keypair"],
}


@pytest.mark.parametrize("module", sorted(SURFACES))
def test_the_module_exports_exactly_its_public_surface(module: str) -> None:
    mod = importlib.import_module(module)
    assert sorted(mod.__all__) == sorted(SURFACES[module])
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.__all__ names {name!r}, which it does not define"


@pytest.mark.parametrize("module", sorted(SURFACES))
def test_nothing_public_the_module_defines_is_left_out(module: str) -> None:
    mod = importlib.import_module(module)
    defined = {n for n, v in vars(mod).items() if not n.startswith("_") and (
        (inspect.isclass(v) or inspect.isfunction(v)) and v.__module__ == module
        or n.isupper() and n not in ("T", "TYPE_CHECKING"))}
    assert defined <= set(mod.__all__), sorted(defined - set(mod.__all__))


def test_every_message_type_of_the_wire_contract_is_exported() -> None:
    """fleet.protocol re-exports what its submodules define: each message type (a dataclass subclass of Message)
    there is in the package's ``__all__``, so a client never imports a submodule to parse an answer."""
    import fleet.protocol
    from fleet.protocol import Message

    defined = set()
    for info in pkgutil.iter_modules(fleet.protocol.__path__):
        mod = importlib.import_module(f"fleet.protocol.{info.name}")
        defined |= {n for n, v in vars(mod).items() if inspect.isclass(v) and issubclass(v, Message)
                    and v.__module__ == mod.__name__ and "__dataclass_fields__" in vars(v)  # not the mixins
                    and not n.startswith("_")}
    assert defined, "found no message types in fleet.protocol's submodules"
    assert defined <= set(fleet.protocol.__all__), sorted(defined - set(fleet.protocol.__all__))
