"""Security at the hub's boundary, against the real server process (two workers, so revocations must
cross processes): device isolation, revoked tokens, admin-only routes, expiring signed image links,
path traversal, oversized payloads, and the whole API fuzzed from its OpenAPI schema with zero 5xx.
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

import httpx
import numpy as np
import pytest

from fleet.protocol import Case
from tests.support.hub import RunningHub
from tests.support.models import make_model_files

from .support import bearer, fresh_pg_database, publish, record, restartable_hub, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

LIMITS = {
    "FLYWHEEL_HUB_IMAGE_URL_TTL_S": "2",
    "FLYWHEEL_HUB_MAX_JSON_BYTES": "65536",
    "FLYWHEEL_HUB_MAX_IMAGE_BYTES": "262144",
    "FLYWHEEL_HUB_MAX_MODEL_BYTES": "1048576",
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
    case = Case(case_id=case_id or f"{dev}-{hashlib.sha256(image).hexdigest()[:12]}", device_id=dev,
                captured_at=time.time(), model_version=version, predicted_class=0, probs=[0.5, 0.3, 0.2],
                image_sha256=hashlib.sha256(image).hexdigest(), image_size=len(image), tags={"frame": "x"})
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
        stored = c.get("/v1/cases/iso-b-case", headers=bearer(labeler)).json()
        assert stored["device_id"] == "iso-b" and stored["tags"] == {"frame": "x"}
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
    ("POST", "/v1/selections", {"budget": 5, "strategy": "random"}),
    ("POST", "/v1/labels", {"case_id": "iso-b-case", "label": 0, "annotator": "x", "task_id": 1, "annotation_id": 1,
                            "created_at": 1.0}),
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
        names = [t["name"] for t in c.get("/v1/tokens", headers=hub.admin_headers).json()]
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
        versions = [m["version"] for m in c.get("/v1/models", headers=bearer(trainer)).json()]
        assert "sec-huge" not in versions
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
