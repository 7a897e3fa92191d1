"""The model registry: signed uploads verified against the fleet key, versions, statuses, downloads."""

from __future__ import annotations

import hashlib
import json

from fleet.protocol import SignedManifest
from fleet.signing import generate_keypair, load_private_key, sign_manifest
from tests.hub.conftest import HubHarness


def _upload(hub: HubHarness, onnx: bytes, manifest: str) -> object:
    return hub.client.post("/v1/models", headers=hub.trainer, files={"onnx": ("m.onnx", onnx)},
                           data={"manifest": manifest})


def test_upload_list_download_and_promote(bare_hub: HubHarness) -> None:
    hub = bare_hub
    files = hub.register_model("m1")
    files2 = hub.register_model("m2", parent="m1", seed=1)
    models = hub.client.get("/v1/models", headers=hub.trainer).json()
    assert [(m["version"], m["parent_version"], m["status"]) for m in models] == [
        ("m1", None, "candidate"), ("m2", "m1", "candidate")]
    r = hub.client.get("/v1/models/m2/onnx", headers=hub.trainer)
    assert r.status_code == 200 and r.content == files2.onnx_path.read_bytes()
    m = hub.client.get("/v1/models/m1/manifest", headers=hub.trainer).json()
    assert SignedManifest.from_dict(m) == files.signed
    assert hub.client.post("/v1/models/m1/promote", headers=hub.admin).json()["status"] == "active"
    assert hub.client.post("/v1/models/m2/promote", headers=hub.admin).json()["status"] == "active"
    statuses = {m["version"]: m["status"] for m in hub.client.get("/v1/models", headers=hub.trainer).json()}
    assert statuses == {"m1": "retired", "m2": "active"}
    r = hub.client.post("/v1/models/rollback", headers=hub.admin)
    assert r.status_code == 200 and r.json()["active"] == "m1"
    statuses = {m["version"]: m["status"] for m in hub.client.get("/v1/models", headers=hub.trainer).json()}
    assert statuses == {"m1": "active", "m2": "retired"}


def test_same_upload_twice_is_idempotent_and_a_changed_one_conflicts(bare_hub: HubHarness) -> None:
    hub = bare_hub
    files = hub.register_model("m1")
    onnx = files.onnx_path.read_bytes()
    r = _upload(hub, onnx, files.signed.to_json())
    assert r.status_code == 200 and r.json()["already"] is True  # type: ignore[attr-defined]
    other = hub.model_files("m1", seed=5)
    r = _upload(hub, other.onnx_path.read_bytes(), other.signed.to_json())
    assert r.status_code == 409  # type: ignore[attr-defined]


def test_signature_from_another_key_is_refused(bare_hub: HubHarness) -> None:
    hub = bare_hub
    files = hub.model_files("m9")
    stranger = load_private_key(generate_keypair().private_pem)
    forged = sign_manifest(files.manifest, stranger)
    r = _upload(hub, files.onnx_path.read_bytes(), forged.to_json())
    assert r.status_code == 422 and "does not verify" in r.json()["detail"]  # type: ignore[attr-defined]
    assert hub.client.get("/v1/models", headers=hub.trainer).json() == []
    assert not list((hub.tmp / "blobs").rglob(files.manifest.onnx_sha256))


def test_tampered_manifest_is_refused(bare_hub: HubHarness) -> None:
    hub = bare_hub
    files = hub.model_files("m9")
    d = json.loads(files.signed.to_json())
    d["manifest"]["class_names"] = ["cat", "dog", "eel"]
    r = _upload(hub, files.onnx_path.read_bytes(), json.dumps(d))
    assert r.status_code == 422  # type: ignore[attr-defined]


def test_onnx_bytes_must_match_the_manifest(bare_hub: HubHarness) -> None:
    hub = bare_hub
    files = hub.model_files("m9")
    onnx = files.onnx_path.read_bytes()
    r = _upload(hub, onnx + b"\0", files.signed.to_json())
    assert r.status_code == 400 and hashlib.sha256(onnx).hexdigest() in r.json()["detail"]  # type: ignore[attr-defined]
    assert hub.client.get("/v1/models", headers=hub.trainer).json() == []


def test_malformed_model_uploads(bare_hub: HubHarness) -> None:
    hub = bare_hub
    assert _upload(hub, b"x", "{not json").status_code == 422  # type: ignore[attr-defined]
    assert _upload(hub, b"x", '{"manifest": 1}').status_code == 422  # type: ignore[attr-defined]
    r = hub.client.post("/v1/models", headers=hub.trainer, data={"manifest": "{}"})
    assert r.status_code == 422 and "'onnx'" in r.json()["detail"]
    files = hub.model_files("m9")
    d = json.loads(files.signed.to_json())
    d["manifest"]["version"] = "../evil"  # path traversal inside the manifest
    r = _upload(hub, files.onnx_path.read_bytes(), json.dumps(d))
    assert r.status_code == 422 and "version" in r.json()["detail"]  # type: ignore[attr-defined]


def test_unknown_versions_and_bad_names(bare_hub: HubHarness) -> None:
    hub = bare_hub
    assert hub.client.get("/v1/models/nope/manifest", headers=hub.trainer).status_code == 404
    assert hub.client.post("/v1/models/nope/promote", headers=hub.admin).status_code == 404
    assert hub.client.get("/v1/models/bad%20name/onnx", headers=hub.trainer).status_code == 422
    assert hub.client.post("/v1/models/m1/promote", headers=hub.trainer).status_code == 403


def test_hub_without_a_key_refuses_uploads(hub_factory: object) -> None:
    hub = hub_factory(signing_public_key=None)  # type: ignore[operator]
    files = hub.model_files("m1")
    r = _upload(hub, files.onnx_path.read_bytes(), files.signed.to_json())
    assert r.status_code == 422 and "public key" in r.json()["detail"]  # type: ignore[attr-defined]


def test_devices_download_models(hub: HubHarness) -> None:
    r = hub.client.get("/v1/models/m1/onnx", headers=hub.devices["d1"])
    assert r.status_code == 200 and r.headers["x-onnx-sha256"] == hashlib.sha256(r.content).hexdigest()
    assert hub.client.post("/v1/models/m1/retire", headers=hub.devices["d1"]).status_code == 403
