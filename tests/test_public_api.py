"""The library-like modules export exactly their public surface (httpx's exported-members test, per module):
``__all__`` equals the list pinned here, every name in it resolves, and nothing public is left out."""

from __future__ import annotations

import importlib
import inspect

import pytest

SURFACES = {
    "fleet.errors": [
        "Conflict", "FlywheelError", "Forbidden", "IntegrityError", "InvalidInput", "MissingExtra", "NotFound",
        "PayloadTooLarge", "PermanentError", "ProtocolError", "RETRYABLE_STATUS", "RequestTimeout", "RetryableError",
        "ServerBusy", "TooManyRequests", "TransportError", "Unauthorized", "UnsupportedMedia", "error_for_response",
        "error_for_status", "headers_for", "parse_retry_after", "require", "response_detail", "status_for"],
    "fleet.retry": ["NO_RETRY", "RetryPolicy", "retrying"],
    "fleet.consensus": [
        "AnnotatorScore", "Rules", "Ruling", "STATUSES", "Vote", "box_f1", "decide", "detection_f1", "gold_accuracy",
        "majority_vote", "match_same_class", "merge_boxes", "merge_detections", "pairwise_agreement",
        "score_annotators", "vote_counts"],
    "fleet.consensus_boxes": [
        "box_f1", "check_box_classes", "detection_f1", "match_same_class", "merge_boxes", "merge_detections"],
    "fleet.signing": [
        "KeyPair", "PRIVATE_KEY_ENV", "generate_keypair", "key_id", "load_private_key", "public_key_b64",
        "sign_manifest", "verify_file_sha256", "verify_manifest", "write_keypair"],
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
