"""The model registry: signed uploads verified against the fleet key, versions, statuses, downloads."""

from __future__ import annotations

import hashlib
import json

from fleet.errors import FlywheelError, status_for
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
    assert [(m.version, m.parent_version, m.status) for m in hub.models()] == [
        ("m1", None, "candidate"), ("m2", "m1", "candidate")]
    r = hub.client.get("/v1/models/m2/onnx", headers=hub.trainer)
    assert r.status_code == 200 and r.content == files2.onnx_path.read_bytes()
    m = hub.client.get("/v1/models/m1/manifest", headers=hub.trainer).json()
    assert SignedManifest.from_dict(m) == files.signed
    first = hub.client.post("/v1/models/m1/promote", headers=hub.admin).json()
    assert first["status"] == "active" and first["rollout"] is None  # the first active model: at once
    # over an active model, a promotion goes through a rollout to the whole fleet (its checks apply) ...
    second = hub.client.post("/v1/models/m2/promote", headers=hub.admin).json()
    assert second["status"] == "canary" and second["rollout"]["kind"] == "promotion"
    assert second["rollout"]["stages"] == [1.0] and second["rollout"]["incumbent"] == "m1"
    # ... unless an admin overrides, which is recorded
    r = hub.client.post("/v1/models/m2/promote", headers=hub.admin, json={"override": True, "reason": "hotfix"})
    assert r.status_code == 200 and r.json()["status"] == "active", r.text
    assert r.json()["rollout"]["kind"] == "override" and "admin override by bootstrap-admin: hotfix" in \
        r.json()["rollout"]["reason"]
    statuses = hub.model_statuses()
    assert statuses == {"m1": "retired", "m2": "active"}
    r = hub.client.post("/v1/models/rollback", headers=hub.admin)
    assert r.status_code == 200 and r.json()["active"] == "m1"
    statuses = hub.model_statuses()
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
    assert hub.model_statuses() == {}
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
    assert hub.model_statuses() == {}


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


def _big_signed(hub: HubHarness, path: object, size: int) -> tuple[object, str]:
    """A ``size``-byte stand-in ONNX file at ``path`` and a manifest signed for exactly those bytes."""
    import dataclasses
    from pathlib import Path

    p = Path(str(path))
    block = bytes(range(256)) * 4096  # 1 MiB
    h = hashlib.sha256()
    with p.open("wb") as fh:
        for _ in range(size // len(block)):
            fh.write(block)
            h.update(block)
    files = hub.model_files("big")
    manifest = dataclasses.replace(files.signed.manifest, onnx_sha256=h.hexdigest(), onnx_size=size)
    return p, sign_manifest(manifest, load_private_key(hub.keypair.private_pem)).to_json()


def test_model_uploads_are_checked_and_stored_in_bounded_memory(bare_hub: HubHarness, tmp_path: object) -> None:
    """64 MiB through register_model: hashed and copied in 1 MiB chunks, never held whole (tracemalloc)."""
    import tracemalloc
    from pathlib import Path

    from fleet.hub.routes.models import register_model

    hub = bare_hub
    path, manifest = _big_signed(hub, Path(str(tmp_path)) / "big.onnx", 64 << 20)
    assert isinstance(path, Path)
    peaks = {}
    for name, mutate in (("bad", True), ("good", False)):
        with path.open("r+b") as fh:
            if mutate:
                fh.seek(32 << 20)
                fh.write(b"X")
                fh.seek(0)
            tracemalloc.start()
            try:
                status, body = register_model(hub.hub, manifest, fh)  # type: ignore[arg-type]
            except FlywheelError as exc:  # the bad one is refused
                status, body = status_for(exc), {"detail": str(exc)}
            peaks[name] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            if mutate:
                fh.seek(32 << 20)
                fh.write(bytes([(32 << 20) % 256]))
        assert status == (400 if mutate else 201), body
    assert max(peaks.values()) < 8 << 20, peaks  # a few 1 MiB chunks, not 64 MiB
    r = hub.client.get("/v1/models/big/onnx", headers=hub.trainer)
    assert r.status_code == 200 and len(r.content) == 64 << 20
    assert hashlib.sha256(r.content).hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_onnx_file_longer_than_its_manifest_is_refused_after_reading_only_what_it_declares(
        bare_hub: HubHarness) -> None:
    hub = bare_hub
    files = hub.model_files("m9")
    onnx = files.onnx_path.read_bytes()
    r = _upload(hub, onnx + b"\0" * (1 << 20), files.signed.to_json())
    assert r.status_code == 400 and f"more than {len(onnx)} bytes" in r.json()["detail"]  # type: ignore[attr-defined]
    assert hub.model_statuses() == {}


def test_a_model_signed_by_a_key_no_longer_trusted_is_not_served_as_active(hub_factory: object,
                                                                            tmp_path: object) -> None:
    """Switch the fleet key to B and back to A: the B-signed model stops being active, the A-signed returns."""
    from pathlib import Path

    from tests.support.models import make_model_files

    a: HubHarness = hub_factory()  # type: ignore[operator]
    a.register_model("m1", promote=True)
    a.enroll("d1")
    other = generate_keypair()
    b: HubHarness = hub_factory(signing_public_key=other.public_b64)  # type: ignore[operator]
    statuses = b.model_statuses()
    assert statuses == {"m1": "retired"}  # nothing B's devices could verify is active
    files = make_model_files(Path(str(tmp_path)) / "b", "m2", private_key=load_private_key(other.private_pem))
    r = _upload(b, files.onnx_path.read_bytes(), files.signed.to_json())
    assert r.status_code == 201, r.text  # type: ignore[attr-defined]
    assert b.client.post("/v1/models/m2/promote", headers=b.admin).json()["status"] == "active"

    back: HubHarness = hub_factory()  # type: ignore[operator]  # the key switched back to A
    statuses = back.model_statuses()
    assert statuses == {"m1": "active", "m2": "retired"}
    r = back.client.get("/v1/assignment", params={"device_id": "d1"}, headers=back.admin)
    assert r.json()["active"]["version"] == "m1"
