"""Limits on every body and every JSON part: size, encoding, nesting and read time, each a clear 4xx, never a 500."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from sqlmodel import Session

from fleet.hub.bodies import json_depth, loads_or_none
from fleet.hub.models import WebhookEvent
from tests.hub.conftest import HubHarness, png_bytes
from tests.hub.test_cases import _counts
from tests.hub.test_cases_batch import post_batch

WEBHOOK = {"X-Flywheel-Webhook-Secret": "dev-webhook-secret", "Content-Type": "application/json"}


def nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


def deep_case_json(hub: HubHarness, depth: int) -> str:
    case, _ = hub.make_case("d1")
    doc = json.loads(case.to_json())
    return json.dumps(doc)[:-1] + f', "tags": {{"k": {nested(depth)}}}}}'


def test_json_depth_counts_brackets_outside_strings() -> None:
    assert json_depth('{"a": 1}') == 1
    assert json_depth('[[1], {"b": [2]}]') == 3
    assert json_depth('{"a": "[[[[[[", "b": "\\"[[[["}') == 1  # brackets in strings, escaped quotes
    assert json_depth("17") == 0
    assert json_depth(nested(5000)) == 5000


def test_stored_json_reads_back_or_says_why() -> None:
    assert loads_or_none('{"a": 1}', max_depth=8) == ({"a": 1}, None)
    assert loads_or_none(nested(50), max_depth=8)[1] == "nested 50 levels deep (limit 8)"
    assert "not valid JSON" in str(loads_or_none("\ufeff{}", max_depth=8)[1])


@pytest.mark.parametrize(("body", "status", "needle"), [
    ('{"action": "ANNOTATION_CREATED"}'.encode("utf-16"), 415, "UTF-16"),
    ('{"action": "ANNOTATION_CREATED"}'.encode("utf-16-le"), 415, "UTF-8"),
    (b"\xef\xbb\xbf" + b'{"action": "x"}', 415, "byte-order mark"),
    (b'{"action": "\xff\xfe"}', 415, "not valid UTF-8"),
    (nested(300).encode(), 400, "300 levels deep"),
    (nested(100_000).encode(), 400, "levels deep"),
    (b'{"n": ' + b"1" * 5000 + b"}", 400, "not valid JSON"),
    (b"[1, 2]", 422, "JSON object"),
])
def test_bad_webhook_bodies_are_refused_and_never_stored(hub: HubHarness, body: bytes, status: int,
                                                         needle: str) -> None:
    r = hub.client.post("/v1/labeling/webhook", content=body, headers=WEBHOOK)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]
    r = hub.client.get("/v1/labeling/events", params={"after": 0}, headers=hub.labeler)
    assert r.status_code == 200 and r.json()["events"] == []


def test_one_bad_stored_event_never_jams_the_feed(hub: HubHarness) -> None:
    """Events an older hub stored unchecked come back with ``body: null`` and the reason; the rest flow."""
    with Session(hub.hub.engine) as s:
        for i, body in enumerate([nested(300), "\ufeff{}", "{not json"]):
            s.add(WebhookEvent(body_sha256=f"{i:064x}", body=body, received_at=1.0))
        s.commit()
    good = json.dumps({"action": "ANNOTATION_CREATED", "annotation": {"id": 7}}).encode()
    assert hub.client.post("/v1/labeling/webhook", content=good, headers=WEBHOOK).status_code == 204
    r = hub.client.get("/v1/labeling/events", params={"after": 0}, headers=hub.labeler)
    assert r.status_code == 200, r.text
    events = r.json()["events"]
    assert [e["body"] is None for e in events] == [True, True, True, False]
    assert "300 levels deep" in events[0]["error"] and "not valid JSON" in events[1]["error"]
    assert events[3]["body"]["annotation"] == {"id": 7}


def test_deeply_nested_case_part_is_a_4xx(hub: HubHarness) -> None:
    _, image = hub.make_case("d1")
    for depth in (200, 5000):
        r = hub.client.post("/v1/cases", headers=hub.devices["d1"], data={"case": deep_case_json(hub, depth)},
                            files={"image": ("f.png", image, "image/png")})
        assert r.status_code == 400 and f"{depth + 2} levels deep" in r.json()["detail"], r.text
    assert _counts(hub) == (0, 0, 0)


def test_a_deeply_nested_batch_part_is_rejected_alone(hub: HubHarness) -> None:
    good = hub.make_case("d1")
    r = post_batch(hub, [good, (deep_case_json(hub, 5000), png_bytes(3))])
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert results[0]["status"] == "created"
    assert results[1]["status"] == "rejected" and results[1]["error_status"] == 400
    assert "levels deep" in results[1]["error"]


def test_deeply_nested_or_utf16_manifest_part_is_a_4xx(bare_hub: HubHarness) -> None:
    hub = bare_hub
    files = hub.model_files("m9")
    onnx = files.onnx_path.read_bytes()
    for manifest, status in ((nested(5000), 400), (files.signed.to_json().encode("utf-16"), 415)):
        r = hub.client.post("/v1/models", headers=hub.trainer, files={
            "onnx": ("m.onnx", onnx, "application/octet-stream"), "manifest": ("m.json", manifest)})
        assert r.status_code == status, r.text
    assert hub.model_statuses() == {}


@pytest.mark.parametrize(("body", "status"), [
    (nested(5000).encode(), 400),
    (json.dumps({"device_id": "d1", "sent_at": 1.0, "boot_id": "b1", "model_version": "m1"}).encode("utf-16"), 415),
])
def test_every_json_route_checks_depth_and_encoding_before_parsing(hub: HubHarness, body: bytes, status: int) -> None:
    for path, headers in (("/v1/heartbeats", hub.devices["d1"]), ("/v1/labels", hub.labeler),
                          ("/v1/enroll", {}), ("/v1/campaigns", hub.admin)):
        for ctype in ("application/json", None):
            h = {**headers, **({"Content-Type": ctype} if ctype else {})}
            r = hub.client.post(path, content=body, headers=h)
            assert r.status_code == status, (path, ctype, r.status_code, r.text)


@pytest.mark.parametrize("value", [2**53 + 1, 2**63, 2**64, 2**70])
def test_heartbeat_counters_past_the_bound_are_refused(hub: HubHarness, value: int) -> None:
    for change in ({"counters": {"frames_seen": value}}, {"human_compared": value}):
        body = {"device_id": "d1", "sent_at": 1.0, "boot_id": "b1", "model_version": "m1", **change}
        r = hub.client.post("/v1/heartbeats", json=body, headers=hub.devices["d1"])
        assert r.status_code == 422 and "<= 9007199254740992" in r.json()["detail"], r.text


# ---------------------------------------------------------------------------------------------
# the read deadline, driven through the ASGI interface with a client that stalls mid-body
# ---------------------------------------------------------------------------------------------


async def _stalled(app: Any, path: str, headers: dict[str, str], first: bytes, *, total: int) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    parts = [first]

    async def receive() -> dict[str, Any]:
        if parts:
            return {"type": "http.request", "body": parts.pop(), "more_body": True}
        await asyncio.sleep(3600)  # the rest never comes
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    raw = [(k.lower().encode(), v.encode()) for k, v in {**headers, "content-length": str(total)}.items()]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "path": path,
             "raw_path": path.encode(), "query_string": b"", "headers": raw, "scheme": "http",
             "server": ("hub.test", 80), "client": ("127.0.0.1", 5555), "root_path": "", "app": app}
    await asyncio.wait_for(app(scope, receive, send), 10)
    return sent


@pytest.mark.parametrize(("path", "ctype"), [("/v1/heartbeats", "application/json"),
                                             ("/v1/cases", "multipart/form-data; boundary=b"),
                                             ("/v1/labeling/webhook", "application/octet-stream")])
def test_a_stalled_body_gets_408_and_the_connection_closes(hub_factory: Any, path: str, ctype: str) -> None:
    hub: HubHarness = hub_factory(body_timeout_s=0.3)
    hub.register_model("m1", promote=True)
    token = hub.enroll("d1")
    headers = {**token, "Content-Type": ctype, "X-Flywheel-Webhook-Secret": "dev-webhook-secret"}
    sent = asyncio.run(_stalled(hub.app, path, headers, b'{"device_id": "d1", ', total=5000))
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 408, sent
    assert (b"connection", b"close") in [(k.lower(), v) for k, v in start["headers"]]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert b"not received within 0.3 s" in body and b"of 5000" in body


def test_a_response_sent_before_the_body_is_read_closes_the_connection(hub: HubHarness) -> None:
    """Refused on its token before its body was read: the rest of that body is never waited for."""
    headers = {"Authorization": "Bearer nope", "Content-Type": "multipart/form-data; boundary=b"}
    sent = asyncio.run(_stalled(hub.app, "/v1/cases", headers, b"--b\r\n", total=5000))
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 401
    assert (b"connection", b"close") in [(k.lower(), v) for k, v in start["headers"]]
