"""The OpenAPI document describes every request body and every response, with fleet.protocol's types, and
tells the truth: what the hub answers validates against what the document says it answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import fleet.protocol
from fleet.signing import KeyPair
from tests.hub.conftest import HubHarness, build_settings

METHODS = ("get", "post", "put", "patch", "delete")
# non-JSON answers, by what they are (a schema is optional for these media types)
MEDIA = {"application/octet-stream", "application/x-ndjson", "application/x-tar", "image/png",
         "text/plain; version=0.0.4; charset=utf-8"}


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory, keypair: KeyPair) -> dict[str, Any]:
    from fleet.hub.app import create_app

    tmp = tmp_path_factory.mktemp("openapi")
    return create_app(build_settings(tmp, f"sqlite:///{tmp / 'hub.db'}", keypair)).openapi()


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method.upper(), path, op) for path, item in document["paths"].items()
            for method, op in item.items() if method in METHODS]


def test_every_operation_documents_a_success_response(document: dict[str, Any]) -> None:
    missing = []
    for method, path, op in operations(document):
        ok = {code: r for code, r in op["responses"].items() if code.startswith("2")}
        described = [code for code, r in ok.items()
                     if code == "204" and not r.get("content")  # no content, and says so
                     or any(media in MEDIA or "schema" in spec for media, spec in (r.get("content") or {}).items())]
        if not described:
            missing.append(f"{method} {path}: {ok}")
    assert not missing, missing
    assert len(operations(document)) >= 49


def test_json_answers_are_fleet_protocol_messages(document: dict[str, Any]) -> None:
    """Every JSON success answer is one of the wire contract's types (no ad-hoc dicts)."""
    names = set(fleet.protocol.__all__)
    wrong = []
    for method, path, op in operations(document):
        for code, r in op["responses"].items():
            schema = (r.get("content") or {}).get("application/json", {}).get("schema")
            if code.startswith("2") and schema is not None:
                ref = schema.get("$ref", "")
                if ref.removeprefix("#/components/schemas/") not in names:
                    wrong.append(f"{method} {path} {code}: {schema}")
    assert not wrong, wrong


def test_every_request_body_has_a_schema(document: dict[str, Any]) -> None:
    missing = []
    for method, path, op in operations(document):
        for media, spec in op.get("requestBody", {}).get("content", {}).items():
            if not spec.get("schema"):
                missing.append(f"{method} {path} {media}")
    assert not missing, missing
    # the routes that read a body say so (FastAPI cannot see the bodies they parse themselves)
    bodies = {f"{m} {p}" for m, p, op in operations(document) if "requestBody" in op}
    assert {"POST /v1/models", "POST /v1/cases", "POST /v1/cases/batch", "POST /v1/tokens", "POST /v1/rollouts",
            "POST /v1/campaigns", "POST /v1/models/{version}/promote", "POST /v1/models/rollback",
            "POST /v1/novelty-banks", "POST /v1/devices/{device_id}/enrollment-token"} <= bodies


def test_what_the_hub_answers_is_what_the_document_says(hub: HubHarness, tmp_path: Path) -> None:
    """Admin and trainer answers, in a hub with a rollout, a campaign and a revoked token, validate against the
    document's schemas (each message's own JSON, not a re-encoding by FastAPI)."""
    import jsonschema

    doc = hub.app.openapi()
    hub.register_model("m2", seed=1)
    r = hub.client.post("/v1/rollouts", json={"version": "m2", "stages": [0.5, 1.0]}, headers=hub.trainer)
    rollout_id = r.json()["rollout_id"]
    spec = {"format": "flywheel.trigger/1", "id": "rare", "version": 1, "rule": {"trigger": "entropy", "above": 0.5}}
    calls: list[tuple[str, str, Any, dict[str, str]]] = [
        ("POST", "/v1/campaigns", {"spec": spec, "groups": ["default"]}, hub.admin),
        ("POST", "/v1/campaigns", {"spec": spec, "groups": ["default"]}, hub.admin),  # again: 200, already
        ("GET", "/v1/campaigns", None, hub.admin),
        ("GET", "/v1/campaigns/rare", None, hub.admin),
        ("POST", "/v1/tokens", {"scope": "labeler", "name": "doc-labeler"}, hub.admin),
        ("DELETE", "/v1/tokens/doc-labeler", None, hub.admin),
        ("GET", "/v1/tokens", None, hub.admin),
        ("POST", "/v1/devices/d9/enrollment-token", {"ttl_s": 60}, hub.admin),
        ("GET", "/v1/devices", None, hub.admin),
        ("GET", "/v1/enrollment-attempts", None, hub.admin),
        ("GET", "/v1/models", None, hub.trainer),
        ("GET", "/v1/models/m2", None, hub.trainer),
        ("GET", "/v1/models/m2/manifest", None, hub.devices["d1"]),
        ("GET", "/v1/rollouts", None, hub.trainer),
        ("GET", f"/v1/rollouts/{rollout_id}", None, hub.trainer),
        ("GET", "/v1/summary", None, hub.trainer),
        ("GET", "/healthz", None, {}),
        ("GET", "/v1/novelty-banks", None, hub.trainer),
        ("POST", f"/v1/rollouts/{rollout_id}/advance", None, hub.trainer),
        ("POST", f"/v1/rollouts/{rollout_id}/rollback", {"reason": "doc test"}, hub.trainer),
        ("POST", "/v1/models/m2/retire", None, hub.admin),
        ("POST", "/v1/models/m2/promote", {"override": True, "reason": "doc test"}, hub.admin),
        ("POST", "/v1/models/rollback", None, hub.admin),
        ("POST", "/v1/devices/d1/revoke", None, hub.admin),
    ]
    for method, path, body, headers in calls:
        r = hub.client.request(method, path, json=body, headers=headers)
        assert r.status_code < 300, (method, path, r.text)
        template = min((p for p in doc["paths"] if _matches(p, path) and method.lower() in doc["paths"][p]),
                       key=lambda p: p.count("{"))  # /v1/models/rollback before /v1/models/{version}
        answer = doc["paths"][template][method.lower()]["responses"][str(r.status_code)]
        schema = answer["content"]["application/json"]["schema"]
        jsonschema.validate(r.json(), {**schema, "components": doc["components"]})


def test_metrics_are_prometheus_text_as_documented(hub: HubHarness) -> None:
    r = hub.client.get("/metrics", headers=hub.admin)
    documented = hub.app.openapi()["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert r.status_code == 200 and r.headers["content-type"] in documented
    assert "flywheel_cases{state=\"unlabeled\"}" in r.text


def _matches(template: str, path: str) -> bool:
    t, p = template.strip("/").split("/"), path.strip("/").split("/")
    return len(t) == len(p) and all(a == b or a.startswith("{") for a, b in zip(t, p, strict=True))
