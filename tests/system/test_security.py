"""Security at the hub's boundary, against the real server process (two workers, so revocations must
cross processes): device isolation, revoked tokens, admin-only routes, expiring signed image links,
path traversal, oversized payloads, and the whole API fuzzed from its OpenAPI schema with zero 5xx.

The probes of issue 13 follow: identity takeover at enrollment, forged field metrics, blob leaks,
bodies that are too deep, in the wrong encoding or too slow, decompression bombs, concurrent bad
model uploads (the hub's memory measured), promotions every device refuses, a signing key switched
back, the dev-mode warning, private files, and the demo's trainer token.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pytest

from fleet.protocol import (
    CaseReceipt,
    EnrollmentAttemptList,
    RolloutList,
    RolloutPublic,
    SelectedCase,
    TokenList,
)
from tests.support.cases import make_case
from tests.support.hub import RunningHub
from tests.support.models import make_model_files

from .support import (
    bearer,
    fresh_pg_database,
    model_statuses,
    publish,
    record,
    restartable_hub,
    rollout_state,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

LIMITS = {
    "FLYWHEEL_HUB_IMAGE_URL_TTL_S": "2",
    "FLYWHEEL_HUB_MAX_JSON_BYTES": "65536",
    "FLYWHEEL_HUB_MAX_IMAGE_BYTES": "262144",
    "FLYWHEEL_HUB_MAX_MODEL_BYTES": "1048576",
    "FLYWHEEL_HUB_BODY_TIMEOUT_S": "2",
    "FLYWHEEL_HUB_ENROLL_MAX_FAILURES": "5",
    "FLYWHEEL_HUB_ENROLL_FAILURE_WINDOW_S": "4",
}
SECRET_MARKERS = (b"SQLite format", b"root:x:", b"PRIVATE KEY")


def png(seed: int, side: int = 8) -> bytes:
    from PIL import Image

    img = np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def case_json(dev: str, image: bytes, *, case_id: str | None = None, version: str = "sec-v1",
              **extra: Any) -> str:
    """A valid Case for ``dev`` as JSON, with ``extra`` fields overwritten (valid or not)."""
    case = make_case(case_id=case_id or f"{dev}-{hashlib.sha256(image).hexdigest()[:12]}", device_id=dev,
                     model_version=version, probs=[0.5, 0.3, 0.2], image=image, tags={"frame": "x"}, triggers=[])
    doc = json.loads(case.to_json())
    doc.update(extra)
    return json.dumps(doc)


def post_case(c: httpx.Client, token: str, text: str, image: bytes) -> httpx.Response:
    return c.post("/v1/cases", headers=bearer(token), data={"case": text},
                  files={"image": ("frame.png", image, "image/png")})


def enroll(c: httpx.Client, hub: RunningHub, device_id: str) -> str:
    r = c.post("/v1/enroll", json={"device_id": device_id, "fleet_secret": hub.fleet_secret})
    assert r.status_code == 200, r.text
    return str(r.json()["token"])


def heartbeat(device_id: str) -> dict[str, Any]:
    return {"device_id": device_id, "sent_at": time.time(), "boot_id": "b1", "model_version": "sec-v1"}


def refused(r: httpx.Response, *codes: int) -> bool:
    """A 4xx (one of ``codes`` if given) that leaks nothing it should not."""
    ok = 400 <= r.status_code < 500 and (not codes or r.status_code in codes)
    return ok and not any(m in r.content for m in SECRET_MARKERS)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningHub]:
    with restartable_hub(tmp_path_factory.mktemp("sec") / "hub", workers=2, extra_env=LIMITS) as running:
        publish(running, make_model_files(tmp_path_factory.mktemp("m"), "sec-v1",
                                          private_key=running.private_key()), running.token("trainer"), promote=True)
        yield running


def test_devices_cannot_touch_each_others_data(hub: RunningHub) -> None:
    tried = 0
    with httpx.Client(base_url=hub.url, timeout=30) as c:
        a, b = enroll(c, hub, "iso-a"), enroll(c, hub, "iso-b")
        img_b = png(1)
        r = post_case(c, b, case_json("iso-b", img_b, case_id="iso-b-case"), img_b)
        assert r.status_code == 201, r.text
        sha_b = hashlib.sha256(img_b).hexdigest()

        img_a = png(2)
        probes = [
            ("case as B", post_case(c, a, case_json("iso-b", img_a), img_a), (403,)),
            ("heartbeat as B", c.post("/v1/heartbeats", headers=bearer(a), json=heartbeat("iso-b")), (403,)),
            ("OTA report as B", c.post("/v1/ota-reports", headers=bearer(a), json={
                "device_id": "iso-b", "version": "sec-v1", "outcome": "refused"}), (403,)),
            ("read B's case", c.get("/v1/cases/iso-b-case", headers=bearer(a)), (403,)),
            ("read the pool", c.get("/v1/pool", headers=bearer(a)), (403,)),
            ("read B's image blob", c.get(f"/v1/blobs/{sha_b}", headers=bearer(a)), (403,)),
            ("bulk blobs", c.post("/v1/blobs/bulk", headers=bearer(a), json={"sha256s": [sha_b]}), (403,)),
            ("B's image unsigned", c.get("/v1/cases/iso-b-case/image", headers=bearer(a)), (403, 422)),
            ("labels", c.get("/v1/labels", headers=bearer(a)), (403,)),
            ("snapshots", c.post("/v1/snapshots", headers=bearer(a), json={}), (403,)),
        ]
        for what, r, codes in probes:
            tried += 1
            assert refused(r, *codes), f"{what}: {r.status_code} {r.text[:300]}"
        # B's case id reused by A: never overwrites B's case
        tried += 1
        r = post_case(c, a, case_json("iso-a", img_a, case_id="iso-b-case"), img_a)
        assert r.status_code != 201 and r.status_code < 500, r.text
        assert "iso-b" not in r.text or r.status_code >= 400, r.text
        # A asking for B's assignment gets its own (or a refusal), never B's
        tried += 1
        r = c.get("/v1/assignment", params={"device_id": "iso-b"}, headers=bearer(a))
        assert r.status_code == 403 or (r.status_code == 200 and r.json()["device_id"] == "iso-a"), r.text
        labeler = hub.token("labeler")
        stored = SelectedCase.from_json(c.get("/v1/cases/iso-b-case", headers=bearer(labeler)).content).case
        assert stored.device_id == "iso-b" and stored.tags == {"frame": "x"}
        blob = c.get(f"/v1/blobs/{sha_b}", headers=bearer(hub.token("trainer")))
        assert blob.content == img_b
    record("security_isolation", cross_device_attempts=tried, refused=tried)


def test_revoked_tokens_are_refused_on_every_worker(hub: RunningHub) -> None:
    with httpx.Client(base_url=hub.url, timeout=30) as c:
        token = enroll(c, hub, "rev-a")
        assert c.post("/v1/heartbeats", headers=bearer(token), json=heartbeat("rev-a")).status_code == 204
        t0 = time.monotonic()
        r = c.post("/v1/devices/rev-a/revoke", headers=hub.admin_headers)
        assert r.status_code == 200, r.text

        def all_refused() -> bool:  # many requests, so both workers answer
            rs = [c.post("/v1/heartbeats", headers=bearer(token), json=heartbeat("rev-a")) for _ in range(6)]
            rs += [c.get("/v1/assignment", headers=bearer(token)) for _ in range(6)]
            return all(x.status_code in (401, 403) for x in rs)

        wait_for("the revoked device token refused everywhere", all_refused, timeout=15, every=0.2)
        device_lag = time.monotonic() - t0
        img = png(3)
        assert refused(post_case(c, token, case_json("rev-a", img), img), 401, 403)
        r = c.post("/v1/enroll", json={"device_id": "rev-a", "fleet_secret": hub.fleet_secret})
        assert r.status_code == 403, r.text  # a revoked device cannot enroll itself back

        # a re-enrolled device's old token dies too (it re-enrolls with that token: the fleet secret
        # alone no longer enrolls an enrolled id, issue 13)
        old = enroll(c, hub, "rev-b")
        r = c.post("/v1/enroll", json={"device_id": "rev-b", "fleet_secret": hub.fleet_secret}, headers=bearer(old))
        assert r.status_code == 200, r.text
        new = r.json()["token"]
        wait_for("the replaced token refused", lambda: all(
            c.get("/v1/assignment", headers=bearer(old)).status_code in (401, 403) for _ in range(6)), timeout=15)
        assert c.get("/v1/assignment", headers=bearer(new)).status_code == 200

        # a named labeler token, revoked by name
        r = c.post("/v1/tokens", headers=hub.admin_headers, json={"scope": "labeler", "name": "rev-labeler"})
        lab = r.json()["token"]
        assert c.get("/v1/pool", headers=bearer(lab)).status_code == 200
        assert c.delete("/v1/tokens/rev-labeler", headers=hub.admin_headers).status_code == 200
        wait_for("the revoked labeler token refused", lambda: all(
            c.get("/v1/pool", headers=bearer(lab)).status_code in (401, 403) for _ in range(6)), timeout=15)

        # tokens that never were
        for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer not-a-token"},
                        {"Authorization": f"Basic {hub.admin_token}"}, {"Authorization": hub.admin_token},
                        {"Authorization": f"Bearer {hub.admin_token}x"}, {"Authorization": "Bearer \u00e9\u00e9"}):
            r = c.get("/v1/pool", headers={k: v.encode() for k, v in headers.items()})
            assert r.status_code in (401, 403), (headers, r.status_code, r.text)
    record("security_revocation", revoked=3, refused_within_s=round(device_lag, 2), bogus_tokens_refused=7)


ADMIN_ROUTES = [
    ("POST", "/v1/tokens", {"scope": "admin", "name": "evil"}),
    ("GET", "/v1/tokens", None),
    ("DELETE", "/v1/tokens/rev-labeler", None),
    ("GET", "/v1/devices", None),
    ("POST", "/v1/devices/iso-b/revoke", None),
    ("POST", "/v1/campaigns", {"id": "evil", "version": 1, "rule": {"trigger": "entropy", "above": 0}}),
    ("GET", "/v1/campaigns", None),
    ("DELETE", "/v1/campaigns/any", None),
    ("POST", "/v1/models/sec-v1/promote", None),
    ("POST", "/v1/models/sec-v1/retire", None),
    ("POST", "/v1/models/rollback", {}),
    ("POST", "/v1/novelty-banks", {}),
    ("GET", "/metrics", None),
]
# and routes for the other scopes, which a device token must not reach either
NOT_FOR_DEVICES = [
    ("GET", "/v1/summary", None),
    ("GET", "/v1/models", None),
    ("POST", "/v1/rollouts", {"version": "sec-v1", "stages": [1.0]}),
    ("PUT", "/v1/models/sec-v1/novelty-bank", None),
    ("POST", "/v1/selections", {"budget": 5, "strategy": "random"}),
    ("POST", "/v1/labels", {"case_id": "iso-b-case", "label": {"task": "classify", "label": 0}, "annotator": "x",
                            "task_id": 1, "annotation_id": 1, "created_at": 1.0}),
    ("GET", "/v1/labeling/events", None),
    ("POST", "/v1/labeling/events/ack", {"up_to": 1}),
    ("GET", "/v1/snapshots", None),
]


def test_admin_routes_refuse_device_labeler_and_trainer_tokens(hub: RunningHub) -> None:
    with httpx.Client(base_url=hub.url, timeout=30) as c:
        tokens = {"device": enroll(c, hub, "adm-dev"), "labeler": hub.token("labeler"),
                  "trainer": hub.token("trainer")}
        tried = 0
        for scope, token in tokens.items():
            for method, path, body in ADMIN_ROUTES + (NOT_FOR_DEVICES if scope == "device" else []):
                r = c.request(method, path, headers=bearer(token), json=body)
                tried += 1
                assert r.status_code == 403, f"{scope} token: {method} {path} -> {r.status_code} {r.text[:200]}"
        assert c.get("/v1/summary", headers=hub.admin_headers).status_code == 200
        names = [t.name for t in TokenList.from_json(c.get("/v1/tokens", headers=hub.admin_headers).content).tokens]
        assert "evil" not in names
    record("security_admin_routes", attempts=tried, refused=tried)


def test_signed_image_links_verify_and_expire(hub: RunningHub) -> None:
    with httpx.Client(base_url=hub.url, timeout=30) as c:
        dev = enroll(c, hub, "img-dev")
        img = png(4)
        r = post_case(c, dev, case_json("img-dev", img, case_id="img-case"), img)
        assert r.status_code == 201, r.text
        url = c.get("/v1/cases/img-case", headers=bearer(hub.token("labeler"))).json()["image_url"]
        got = httpx.get(url, timeout=30)
        assert got.status_code == 200 and got.content == img
        exp = int(re.search(r"exp=(\d+)", url).group(1))  # type: ignore[union-attr]
        sig = re.search(r"sig=([^&]+)", url).group(1)  # type: ignore[union-attr]
        base = f"{hub.url}/v1/cases"
        forged = [
            f"{base}/img-case/image?exp={exp}&sig={sig[:-2]}{'00' if not sig.endswith('00') else '11'}",
            f"{base}/img-case/image?exp={exp + 3600}&sig={sig}",  # a longer life, same signature
            f"{base}/iso-b-case/image?exp={exp}&sig={sig}",  # another case, same signature
            f"{base}/img-case/image?exp={exp}",
            f"{base}/img-case/image?exp={exp}&sig=%C3%A9%00%FF",
            f"{base}/img-case/image?exp=-1&sig={sig}",
            f"{base}/img-case/image?exp=99999999999999999999999999&sig={sig}",
        ]
        for u in forged:
            r = httpx.get(u, timeout=30)
            assert refused(r, 403, 404, 422), (u, r.status_code, r.text[:200])
        time.sleep(max(0.0, exp - time.time()) + 1.2)
        r = httpx.get(url, timeout=30)
        assert r.status_code == 403 and "expired" in r.text, r.text
    record("security_image_links", forged_links_refused=len(forged), expired_link_refused=True, ttl_s=2)


def test_path_traversal_and_oversized_payloads_are_refused(hub: RunningHub, tmp_path: Path) -> None:
    trav = ["..%2F..%2Fhub.db", "%2e%2e%2f%2e%2e%2fhub.db", "..%5C..%5Chub.db", "....%2F%2Fhub.db",
            "%2Fetc%2Fpasswd", "..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd", "%00hub.db"]
    with httpx.Client(base_url=hub.url, timeout=60) as c:
        dev = enroll(c, hub, "trav-dev")
        trainer, labeler = hub.token("trainer"), hub.token("labeler")
        tried = 0
        for t in trav:
            for path, token in [(f"/v1/blobs/{t}", trainer), (f"/v1/models/{t}/onnx", dev),
                                (f"/v1/models/{t}/manifest", dev), (f"/v1/novelty-banks/{t}", dev),
                                (f"/v1/cases/{t}", labeler), (f"/v1/cases/{t}/image?exp=9999999999&sig=x", None),
                                (f"/v1/snapshots/{t}/manifest", trainer), (f"/v1/rollouts/{t}", trainer)]:
                r = c.send(c.build_request("GET", httpx.URL(hub.url + path),
                                           headers=bearer(token) if token else {}))
                tried += 1
                assert r.status_code < 500 and not any(m in r.content for m in SECRET_MARKERS), (path, r.status_code)
                assert r.status_code >= 400, (path, r.status_code, r.text[:200])
        r = c.post("/v1/blobs/bulk", headers=bearer(trainer), json={"sha256s": ["../../hub.db", "/etc/passwd"]})
        tried += 1
        assert refused(r, 400, 404, 422), (r.status_code, r.text[:200])
        img = png(5)
        for field, value in [("case_id", "../../../etc/passwd"), ("image_sha256", "../../hub.db"),
                             ("device_id", "../trav-dev"), ("model_version", "../../sec-v1"),
                             ("case_id", "a/b"), ("case_id", "x" * 5000)]:
            r = post_case(c, dev, case_json("trav-dev", img, **{field: value}), img)
            tried += 1
            assert refused(r, 400, 403, 404, 409, 413, 415, 422), (field, r.status_code, r.text[:200])
        for body in ({"device_id": "../../x", "fleet_secret": hub.fleet_secret},
                     {"device_id": "a/../../b", "fleet_secret": hub.fleet_secret}):
            tried += 1
            assert refused(c.post("/v1/enroll", json=body), 422), body
        r = c.post("/v1/campaigns", headers=hub.admin_headers,
                   json={"id": "../../evil", "version": 1, "rule": {"trigger": "entropy", "above": 0}})
        tried += 1
        assert refused(r, 400, 422), r.text
        assert not list(hub.data_dir.parent.glob("**/passwd")) and not (hub.data_dir.parent / "evil").exists()
        traversal = tried

        # oversized: declared and undeclared (chunked) bodies past each route's limit
        big_json = {"device_id": "trav-dev", "sent_at": 1.0, "boot_id": "b", "model_version": None,
                    "counters": {f"k{i}": i for i in range(20000)}}
        oversized = [
            ("heartbeat JSON", c.post("/v1/heartbeats", headers=bearer(dev), json=big_json)),
            ("chunked heartbeat", c.post("/v1/heartbeats", headers={**bearer(dev), "Content-Type": "application/json"},
                                         content=iter([b"{" + b" " * 65536] * 4))),
            ("webhook", c.post("/v1/labeling/webhook", headers={"X-Flywheel-Webhook-Secret": hub.webhook_secret},
                               content=b'{"x": "' + b"a" * 200_000 + b'"}')),
        ]
        huge_png = png(6, side=400)  # ~160 KB of noise
        huge_png = png(6, side=600) if len(huge_png) < 262144 else huge_png
        assert len(huge_png) > 262144
        oversized.append(("image", post_case(c, dev, case_json("trav-dev", huge_png), huge_png)))
        pad = "p" * 70_000
        oversized.append(("case JSON", post_case(c, dev, case_json("trav-dev", img, tags={"pad": pad}), img)))
        oversized.append(("request body", c.post("/v1/cases", headers=bearer(dev), content=b"x" * 600_000,
                                                 params={}, )))
        model = make_model_files(tmp_path, "sec-huge", private_key=hub.private_key(), height=256, width=256)
        assert model.onnx_path.stat().st_size > 1048576 and model.signed is not None
        oversized.append(("model", c.post("/v1/models", headers=bearer(trainer), data={
            "manifest": model.signed.to_json()}, files={"onnx": ("m.onnx", model.onnx_path.read_bytes())})))
        for what, r in oversized:
            assert refused(r, 413), f"{what}: {r.status_code} {r.text[:200]}"
            assert "received" in r.text or "limit" in r.text, (what, r.text[:200])
        assert "sec-huge" not in model_statuses(c, trainer)
        assert c.get("/healthz").status_code == 200
    record("security_bad_input", traversal_probes=traversal, oversized_payloads=len(oversized),
           all_refused_4xx=True)


# ---------------------------------------------------------------------------------------------
# schemathesis: the OpenAPI schema, fuzzed, with an admin token and with a device token
# ---------------------------------------------------------------------------------------------

FUZZ_SECONDS = {"device": int(os.environ.get("FLYWHEEL_SYSTEM_FUZZ_DEVICE_S", "25")),
                "admin": int(os.environ.get("FLYWHEEL_SYSTEM_FUZZ_ADMIN_S", "50"))}


def st_run(hub: RunningHub, token: str, seconds: int, workdir: Path, name: str) -> dict[str, Any]:
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    if st is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    report = workdir / f"{name}.json"
    cmd = [st, "run", hub.url + "/openapi.json", "-H", f"Authorization: Bearer {token}",
           "-H", f"X-Flywheel-Webhook-Secret: {hub.webhook_secret}", "--checks", "not_a_server_error",
           "--max-examples", "25", "--max-time", str(seconds), "--seed", "20240601", "--workers", "2", "--no-shrink",
           "--request-timeout", "20", "--report", "json", "--report-json-path", str(report)]
    run = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=seconds + 180)
    assert report.exists(), run.stdout[-4000:] + run.stderr[-2000:]
    out = dict(json.loads(report.read_text()))
    out["_stdout"] = run.stdout
    return out


def test_openapi_fuzzing_finds_no_server_error(tmp_path: Path) -> None:
    with fresh_pg_database() as db_url, restartable_hub(tmp_path / "hub", database_url=db_url) as hub:
        trainer = hub.token("trainer")
        publish(hub, make_model_files(tmp_path / "m", "fz-v1", private_key=hub.private_key()), trainer, promote=True)
        with httpx.Client(base_url=hub.url, timeout=30) as c:
            device = enroll(c, hub, "fz-dev")
            img = png(7)
            assert post_case(c, device, case_json("fz-dev", img, version="fz-v1"), img).status_code == 201
        results = {}
        for name, token in (("device", device), ("admin", hub.admin_token)):  # device first: admin may revoke it
            rep = st_run(hub, token, FUZZ_SECONDS[name], tmp_path, name)
            failures = rep["failures"]
            assert not failures, f"{name} token: {failures}\n{rep['_stdout'][-8000:]}\n{hub.log()[-3000:]}"
            assert rep["operations"]["tested"] >= 40, rep["operations"]
            results[name] = {"operations": rep["operations"]["tested"], "cases": rep["test_cases"]["generated"],
                             "seconds": round(rep["running_time"], 1)}
        assert "Exception in ASGI application" not in hub.log(), hub.log()[-4000:]
        assert httpx.get(hub.url + "/healthz", timeout=10).status_code == 200
    record("openapi_fuzz", backend="postgresql" if db_url else "sqlite", server_errors=0, **results)


def _text_parameters(spec: dict[str, Any]) -> Iterator[tuple[str, str, str, str]]:
    """(method, path template, where, name) for every path or query parameter of the schema that takes text."""
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for p in op.get("parameters", []):
                kinds = {p["schema"].get("type")} | {a.get("type") for a in p["schema"].get("anyOf", [])}
                if p["in"] in ("path", "query") and "string" in kinds and "enum" not in p["schema"]:
                    yield method.upper(), path, p["in"], p["name"]


def test_every_text_parameter_with_a_nul_byte_is_refused_not_a_500(tmp_path: Path) -> None:
    """What the fuzzing found once by chance (``GET /v1/enrollment-attempts?device_id=...%00...`` was a 500 on
    PostgreSQL, whose text cannot hold a NUL), tried on purpose: every path and query parameter that takes text,
    one at a time, with a NUL in it, with an admin token."""
    with fresh_pg_database() as db_url, restartable_hub(tmp_path / "hub", database_url=db_url) as hub:
        with httpx.Client(base_url=hub.url, timeout=30) as c:
            spec = c.get("/openapi.json").json()
            params = list(_text_parameters(spec))
            assert len(params) >= 20, params
            errors = []
            for method, path, where, name in params:
                bad = "cam\x00-1"
                url = re.sub(r"\{[^}]+\}", "x-1", path.replace("{" + name + "}", quote(bad, safe=""))) \
                    if where == "path" else re.sub(r"\{[^}]+\}", "x-1", path)
                query = {name: bad} if where == "query" else {}
                r = c.request(method, url, params=query, headers=hub.admin_headers)
                if r.status_code >= 500:
                    errors.append(f"{method} {path} ({where} {name}): {r.status_code} {r.text[:200]}")
            assert not errors, "\n".join(errors) + "\n" + hub.log()[-3000:]
        assert "Exception in ASGI application" not in hub.log(), hub.log()[-4000:]
    record("nul_parameters", backend="postgresql" if db_url else "sqlite", parameters=len(params), server_errors=0)


# ---------------------------------------------------------------------------------------------
# issue 13: the probes of an outside attacker and a careless client
# ---------------------------------------------------------------------------------------------


def test_enrollment_cannot_take_over_a_device_and_failures_are_limited(hub: RunningHub) -> None:
    with httpx.Client(base_url=hub.url, timeout=30) as c:
        real = enroll(c, hub, "tk-cam-1")
        r = c.post("/v1/enroll", json={"device_id": "tk-cam-1", "fleet_secret": hub.fleet_secret})
        assert r.status_code == 409 and "already enrolled" in r.text, r.text
        assert c.post("/v1/heartbeats", headers=bearer(real), json=heartbeat("tk-cam-1")).status_code == 204
        img = png(40)
        assert post_case(c, real, case_json("tk-cam-1", img), img).status_code == 201
        # the device's own token re-enrolls it (what `flywheel agent enroll --force` sends)
        again = c.post("/v1/enroll", json={"device_id": "tk-cam-1"}, headers=bearer(real))
        assert again.status_code == 200, again.text
        r = c.get("/v1/enrollment-attempts", params={"device_id": "tk-cam-1"}, headers=hub.admin_headers)
        audit = EnrollmentAttemptList.from_json(r.content).attempts
        assert [a.outcome for a in audit] == ["re-enrolled", "refused", "enrolled"]
        assert audit[1].client == "127.0.0.1" and audit[0].method == "device-token"
        time.sleep(4.2)  # the failure window of LIMITS
        codes = [c.post("/v1/enroll", json={"device_id": f"tk-guess-{i}", "fleet_secret": f"guess-{i}"}).status_code
                 for i in range(8)]
        assert codes[:5] == [401] * 5 and set(codes[5:]) == {429}, codes
        r = c.post("/v1/enroll", json={"device_id": "tk-cam-2", "fleet_secret": hub.fleet_secret})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        time.sleep(4.2)
        assert c.post("/v1/enroll", json={"device_id": "tk-cam-2", "fleet_secret": hub.fleet_secret}).status_code == 200
    record("security_enrollment", takeover_refused=True, wrong_secrets_before_429=5)


def test_reused_case_ids_leave_no_blob_and_the_sweep_removes_orphans(hub: RunningHub) -> None:
    blobs = hub.data_dir / "blobs"

    def files() -> int:
        return sum(1 for p in blobs.rglob("*") if p.is_file())

    with httpx.Client(base_url=hub.url, timeout=30) as c:
        dev = enroll(c, hub, "leak-dev")
        other = enroll(c, hub, "leak-other")
        img = png(50, side=64)
        first = case_json("leak-dev", img, case_id="leak-1")
        assert post_case(c, dev, first, img).status_code == 201
        before = files()
        for i in range(20):
            different = png(1000 + i, side=256)  # ~64 KiB of noise each
            r = post_case(c, dev, case_json("leak-dev", different, case_id="leak-1"), different)
            assert r.status_code == 409 and "different content" in r.text, r.text
            r = post_case(c, other, case_json("leak-other", different, case_id="leak-1"), different)
            assert r.status_code == 409, r.text
        assert CaseReceipt.from_json(post_case(c, dev, first, img).content).status == "already"  # a retry
        assert files() == before  # 40 refused uploads of different images: not one byte stored
    # an orphan an older hub left behind (its bytes, no row) goes with `flywheel hub sweep-blobs`
    orphan = png(77)
    sha = hashlib.sha256(orphan).hexdigest()
    path = blobs / sha[:2] / sha[2:4] / sha
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orphan)
    os.utime(path, (time.time() - 7200, time.time() - 7200))
    env = {k: v for k, v in hub.env.items()}
    sweep = subprocess.run([sys.executable, "-m", "fleet.cli", "hub", "sweep-blobs", "--data-dir", str(hub.data_dir)],
                           env=env, capture_output=True, text=True, timeout=120)
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    report = json.loads(sweep.stdout.strip().splitlines()[-1])
    assert report["removed"] == 1 and not path.exists(), report
    with httpx.Client(base_url=hub.url, timeout=30) as c:
        url = c.get("/v1/cases/leak-1", headers=bearer(hub.token("labeler"))).json()["image_url"]
        assert httpx.get(url, timeout=30).content == img  # what is referenced stays
    record("security_blob_leak", refused_reuses=40, blobs_added=0, orphans_swept=report["removed"])


def _nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


def test_bad_bodies_get_4xx_never_5xx_and_never_jam_the_events_feed(hub: RunningHub, tmp_path: Path) -> None:
    from tests.hub.test_images import inflate_bomb, rgba_bomb, undecodable

    webhook = {"X-Flywheel-Webhook-Secret": hub.webhook_secret, "Content-Type": "application/json"}
    with httpx.Client(base_url=hub.url, timeout=60) as c:
        dev = enroll(c, hub, "body-dev")
        trainer, labeler = hub.token("trainer"), hub.token("labeler")
        img = png(60)
        deep_case = case_json("body-dev", img)[:-1] + f', "tags": {{"k": {_nested(2000)}}}}}'
        model = make_model_files(tmp_path, "body-v9", private_key=hub.private_key())
        probes = [
            ("UTF-16 webhook", c.post("/v1/labeling/webhook", headers=webhook,
                                      content=json.dumps({"action": "X"}).encode("utf-16")), 415),
            ("webhook 300 deep", c.post("/v1/labeling/webhook", headers=webhook, content=_nested(300).encode()), 400),
            ("webhook 5000 deep", c.post("/v1/labeling/webhook", headers=webhook,
                                         content=_nested(5000).encode()), 400),
            ("case part 2000 deep", post_case(c, dev, deep_case, img), 400),
            ("manifest part 2000 deep", c.post("/v1/models", headers=bearer(trainer), files={
                "onnx": ("m.onnx", model.onnx_path.read_bytes()), "manifest": ("m.json", _nested(2000))}), 400),
            ("heartbeat 2000 deep", c.post("/v1/heartbeats", headers=bearer(dev),
                                           content=_nested(2000), params={}), 400),
            ("heartbeat counter 2^64", c.post("/v1/heartbeats", headers=bearer(dev), json={
                **heartbeat("body-dev"), "counters": {"frames_seen": 2**64}}), 422),
            ("heartbeat counter 2^63-1000", c.post("/v1/heartbeats", headers=bearer(dev), json={
                **heartbeat("body-dev"), "counters": {"frames_seen": 2**63 - 1000}}), 422),
        ]
        for name, make in (("4096x4096 RGBA", rgba_bomb), ("1x1 inflating to 100 MB", inflate_bomb),
                           ("28x28 undecodable", undecodable)):
            bomb = make()
            probes.append((f"image: {name}", post_case(c, dev, case_json("body-dev", bomb), bomb), 415))
        for name, r, code in probes:
            assert r.status_code == code, f"{name}: {r.status_code} {r.text[:300]}"
            assert "detail" in r.json() and r.json()["detail"], name
        batch = c.post("/v1/cases/batch", headers=bearer(dev), files=[
            ("case_0", (None, case_json("body-dev", img, case_id="body-ok"))), ("image_0", ("f.png", img, "image/png")),
            ("case_1", (None, deep_case)), ("image_1", ("f.png", img, "image/png"))])
        assert batch.status_code == 200, batch.text
        assert [x["status"] for x in batch.json()["results"]] == ["created", "rejected"]
        events = c.get("/v1/labeling/events", params={"after": 0}, headers=bearer(labeler))
        assert events.status_code == 200, events.text
        assert c.post("/v1/labeling/webhook", headers=webhook, content=b'{"action": "PING"}').status_code == 204
        assert c.get("/v1/labeling/events", params={"after": 0}, headers=bearer(labeler)).status_code == 200
    assert "Exception in ASGI application" not in hub.log() and "Traceback" not in hub.log(), hub.log()[-3000:]
    record("security_bodies", probes=len(probes) + 1, server_errors=0)


def test_half_sent_bodies_time_out_and_free_their_connections(hub: RunningHub) -> None:
    import socket

    host, port = hub.url.removeprefix("http://").split(":")
    socks = []
    t0 = time.monotonic()
    for _ in range(50):  # each sends its headers and 10 bytes of a 50000-byte body, then stalls
        s = socket.create_connection((host, int(port)), timeout=15)
        s.sendall(f"POST /v1/labeling/webhook HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  f"X-Flywheel-Webhook-Secret: {hub.webhook_secret}\r\nContent-Length: 50000\r\n\r\n"
                  '{"a": "xxx'.encode())
        socks.append(s)
    answers = []
    for s in socks:
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:  # the hub closed the connection
                break
            data += chunk
        answers.append(data)
        s.close()
    waited = time.monotonic() - t0
    assert all(a.startswith(b"HTTP/1.1 408") and b"not received within 2 s" in a for a in answers), answers[0][:300]
    assert waited < 12, waited
    assert httpx.get(hub.url + "/healthz", timeout=10).status_code == 200
    record("security_slow_bodies", half_sent=len(socks), all_408_and_closed=True, seconds=round(waited, 1))


def test_the_hub_keeps_its_files_private(hub: RunningHub) -> None:
    import stat

    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in hub.data_dir.iterdir() if p.name.startswith("hub.db")}
    assert modes and set(modes.values()) == {0o600}, modes
    blobs = hub.data_dir / "blobs"
    assert stat.S_IMODE(blobs.stat().st_mode) == 0o700
    some = next(p for p in blobs.rglob("*") if p.is_file())
    assert stat.S_IMODE(some.stat().st_mode) == 0o600 and stat.S_IMODE(some.parent.stat().st_mode) == 0o700
    record("security_private_files", database=sorted(modes), blob_mode="0600", folders="0700")


def _two_models(h: RunningHub, tmp_path: Path, prefix: str) -> str:
    """``{prefix}-v1`` active and ``{prefix}-v2`` registered, both signed with the hub's key; a trainer token."""
    trainer = h.token("trainer")
    key = h.private_key()
    publish(h, make_model_files(tmp_path / "m", f"{prefix}-v1", private_key=key), trainer, promote=True)
    publish(h, make_model_files(tmp_path / "m", f"{prefix}-v2", private_key=key, seed=1, parent=f"{prefix}-v1"),
            trainer)
    return trainer


def test_one_device_cannot_forge_a_rollouts_metrics(tmp_path: Path) -> None:
    with restartable_hub(tmp_path / "hub") as h:
        trainer = _two_models(h, tmp_path, "fm")
        with httpx.Client(base_url=h.url, timeout=30) as c:
            tokens = {f"fm-{i:02d}": enroll(c, h, f"fm-{i:02d}") for i in range(30)}
            r = c.post("/v1/rollouts", headers=bearer(trainer), json={"version": "fm-v2", "stages": [0.2, 1.0]})
            assert r.status_code == 201, r.text
            ro = RolloutPublic.from_json(r.content)
            canary = [d for d in tokens if c.get("/v1/assignment", headers=bearer(tokens[d])).json()["active"]
                      ["version"] == "fm-v2"]
            outside = [d for d in tokens if d not in canary]
            assert len(canary) >= 2 and outside, canary
            forger = outside[0]
            refusal = {"device_id": forger, "version": "fm-v2", "outcome": "refused", "reason": "forged"}
            for _ in range(3):
                assert c.post("/v1/ota-reports", headers=bearer(tokens[forger]), json=refusal).status_code == 204
            hb = {**heartbeat(forger), "model_version": "fm-v2", "human_compared": 1000, "human_disagreed": 1000}
            assert c.post("/v1/heartbeats", headers=bearer(tokens[forger]), json=hb).status_code == 204
            st = rollout_state(h, ro.rollout_id)
            assert st.state == "running" and st.metrics["fm-v2"].health_failures == 0, st
            a = canary[0]  # one canary device alone cannot roll it back either
            for _ in range(3):
                r = c.post("/v1/ota-reports", headers=bearer(tokens[a]), json={**refusal, "device_id": a})
                assert r.status_code == 204
            assert rollout_state(h, ro.rollout_id).state == "running"
            b = canary[1]
            r = c.post("/v1/ota-reports", headers=bearer(tokens[b]), json={**refusal, "device_id": b})
            st = rollout_state(h, ro.rollout_id)
            assert st.state == "rolled_back" and st.reason and a in st.reason and b in st.reason, st
            assert forger not in st.reason
    record("security_field_metrics", forged_reports_counted=0, devices_needed=2, rolled_back_with=[a, b])


def test_promotions_every_device_refuses_are_undone_and_untrusted_keys_are_not_served(tmp_path: Path) -> None:
    from fleet.signing import generate_keypair, load_private_key

    from .support import kill9, respawn

    with restartable_hub(tmp_path / "hub") as h:
        trainer = _two_models(h, tmp_path, "pk")
        env = {**os.environ, "FLYWHEEL_HUB_URL": h.url, "FLYWHEEL_HUB_TOKEN": h.admin_token}
        promote = subprocess.run([sys.executable, "-m", "fleet.cli", "models", "promote", "pk-v2"], env=env,
                                 capture_output=True, text=True, timeout=120)
        assert promote.returncode == 0 and "rolling out to the whole fleet" in promote.stdout, promote.stderr
        with httpx.Client(base_url=h.url, timeout=30) as c:
            devs = {d: enroll(c, h, d) for d in ("pk-a", "pk-b")}
            for d, tok in devs.items():
                assert c.get("/v1/assignment", headers=bearer(tok)).json()["active"]["version"] == "pk-v2"
                r = c.post("/v1/ota-reports", headers=bearer(tok), json={
                    "device_id": d, "version": "pk-v2", "outcome": "refused", "reason": "does not verify"})
                assert r.status_code == 204
            models = model_statuses(c, trainer)
            assert models == {"pk-v1": "active", "pk-v2": "retired"}, models
            rollout = RolloutList.from_json(c.get("/v1/rollouts", headers=bearer(trainer)).content).rollouts[0]
            assert rollout.kind == "promotion" and "every device in the canary (2)" in (rollout.reason or "")

        # the fleet key switched to B, a B-signed model made active, then the key switched back to A
        other = generate_keypair()
        kill9(h)
        h.env["FLYWHEEL_HUB_SIGNING_PUBLIC_KEY"] = other.public_b64
        respawn(h)
        b_model = make_model_files(tmp_path / "b", "pk-b1", private_key=load_private_key(other.private_pem))
        publish(h, b_model, trainer, promote=True)
        with httpx.Client(base_url=h.url, timeout=30) as c:
            models = model_statuses(c, trainer)
            assert models["pk-b1"] == "active" and models["pk-v1"] == "retired", models
        kill9(h)
        h.env["FLYWHEEL_HUB_SIGNING_PUBLIC_KEY"] = h.keypair.public_b64
        respawn(h)
        with httpx.Client(base_url=h.url, timeout=30) as c:
            models = model_statuses(c, trainer)
            assert models["pk-b1"] == "retired" and models["pk-v1"] == "active", models
            a = c.get("/v1/assignment", params={"device_id": "pk-a"}, headers=h.admin_headers).json()
            assert a["active"]["version"] == "pk-v1"
    record("security_promote_and_keys", promotion_refused_everywhere_undone=True, foreign_key_model_served=False)


def test_concurrent_bad_model_uploads_keep_the_hubs_memory_bounded(tmp_path: Path) -> None:
    """Three concurrent 100 MB uploads whose bytes do not match their manifest (a trainer token): the hub
    streams them to disk and hashes them in chunks, so its resident memory grows by far less than one."""
    import concurrent.futures as cf
    import dataclasses

    from fleet.signing import sign_manifest

    size = 100 << 20
    with restartable_hub(tmp_path / "hub") as h:
        trainer = h.token("trainer")
        files = make_model_files(tmp_path / "m", "mem-v1", private_key=h.private_key())
        assert files.signed is not None
        manifest = dataclasses.replace(files.signed.manifest, onnx_size=size, onnx_sha256="0" * 64)
        text = sign_manifest(manifest, h.private_key()).to_json()
        block = os.urandom(1 << 20)

        def body() -> Iterator[bytes]:
            for _ in range(size >> 20):
                yield block

        def upload(_: int) -> int:
            with httpx.Client(timeout=300) as c:
                boundary = "memprobe"
                head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"manifest\"\r\n\r\n{text}\r\n"
                        f"--{boundary}\r\nContent-Disposition: form-data; name=\"onnx\"; filename=\"m.onnx\"\r\n"
                        f"Content-Type: application/octet-stream\r\n\r\n").encode()
                tail_ = f"\r\n--{boundary}--\r\n".encode()

                def stream() -> Iterator[bytes]:
                    yield head
                    yield from body()
                    yield tail_

                r = c.post(h.url + "/v1/models", content=stream(), headers={
                    **bearer(trainer), "Content-Type": f"multipart/form-data; boundary={boundary}"})
                return r.status_code

        def rss_kib() -> int:
            status = Path(f"/proc/{h.process.pid}/status").read_text()
            return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]

        base = rss_kib()
        peak = base
        with cf.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(upload, i) for i in range(3)]
            while not all(f.done() for f in futures):
                peak = max(peak, rss_kib())
                time.sleep(0.05)
            codes = [f.result() for f in futures]
        assert codes == [400] * 3, codes
        grew_mib = (peak - base) / 1024
        assert grew_mib < 64, f"the hub's RSS grew by {grew_mib:.0f} MiB for 3 x {size >> 20} MiB bad uploads"
    record("security_model_upload_memory", uploads=3, mib_each=size >> 20, rss_growth_mib=round(grew_mib, 1),
           rss_base_mib=round(base / 1024, 1))


def test_dev_mode_starts_with_a_loud_warning(tmp_path: Path) -> None:
    from fleet.sim.procs import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_HUB_")}
    proc = subprocess.Popen([sys.executable, "-m", "fleet.cli", "hub", "serve", "--dev", "--port", str(port),
                             "--data-dir", str(tmp_path / "dev-hub")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for("the dev hub", lambda: _up(f"http://127.0.0.1:{port}"), timeout=60)
        r = httpx.get(f"http://127.0.0.1:{port}/v1/devices", headers=bearer("dev-admin-token"), timeout=10)
        assert r.status_code == 200  # it still works for tests
    finally:
        from tests.support.hub import stop

        stop(proc)
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    assert "WARNING: DEV MODE" in out and "dev-admin-token" in out, out[-3000:]
    record("security_dev_mode", warning_printed=True)


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_demo_passes_the_trainers_token_in_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ps` shows every command line to every user: the demo's `flywheel train --publish` must not carry the token."""
    from fleet.sim import demo
    from fleet.sim import trainer as demo_trainer

    seen: dict[str, Any] = {}

    class FakeRun:  # the trainer's process: records how it was started, writes the report a run leaves
        def __init__(self, cmd: list[str], log: Path, *, env: dict[str, str] | None = None, **kw: Any) -> None:
            seen["cmd"], seen["env"] = cmd, env
            out = Path(cmd[cmd.index("--out") + 1])
            out.mkdir(parents=True, exist_ok=True)
            (out / "report.json").write_text(json.dumps({"gate": {"passed": True}, "publish": {"version": "v"}}))

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(demo_trainer, "LoggedRun", FakeRun)
    hub = demo.HubProcess(url="http://127.0.0.1:9", admin_token="a", fleet_secret="f", webhook_secret="w",
                          data_dir=tmp_path, process=None, log_path=tmp_path / "log")  # type: ignore[arg-type]
    trainer = demo.Trainer(demo.DemoSettings(workspace=tmp_path), tmp_path, tmp_path / "key", hub, "fwt_TRAINER",
                           tmp_path / "seed.npz", ["a", "b"])
    trainer.train("base", data="npz:x", epochs=1, publish=True, stages="1.0", warm=None)
    assert not any("fwt_TRAINER" in part for part in seen["cmd"]) and "--token" not in seen["cmd"], seen["cmd"]
    assert seen["env"]["FLYWHEEL_TOKEN"] == "fwt_TRAINER"
