"""Dataset snapshots (versioned JSONL manifests) and blob downloads for the trainer."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

from fleet.protocol import decode_manifest
from tests.hub.conftest import HubHarness


def test_snapshot_holds_accepted_and_gold_labels_only(hub: HubHarness) -> None:
    a, b, c, d = (hub.send_case("d1") for _ in range(4))
    hub.label(a, 1)
    hub.label(b, 2, gold=2)  # the right answer to a gold task
    hub.label(c, 0, gold=1)  # a wrong one: held, never trained on
    r = hub.client.post("/v1/snapshots", json={"name": "first"}, headers=hub.trainer)
    assert r.status_code == 201, r.text
    snap = r.json()
    assert snap["version"] == 1 and snap["n_labels"] == 2
    m = hub.client.get(f"/v1/snapshots/{snap['snapshot_id']}/manifest", headers=hub.trainer)
    assert m.status_code == 200
    assert hashlib.sha256(m.content).hexdigest() == snap["manifest_sha256"]
    header, entries = decode_manifest(m.content)  # the contract's own reader
    assert (header.snapshot_id, header.version, header.task) == (snap["snapshot_id"], 1, "classify")
    assert header.class_names == ["class_0", "class_1", "class_2"] and header.n_entries == 2
    assert {e.case_id: (e.label.label, e.status) for e in entries} == {a: (1, "accepted"), b: (2, "gold")}
    assert all(e.case.device_id == "d1" and e.case.tags == {"condition": "night"} for e in entries)
    assert json.loads(m.text.splitlines()[0])["class_names"] == header.class_names
    hub.label(d, 0)
    snap2 = hub.client.post("/v1/snapshots", headers=hub.trainer).json()
    assert snap2["version"] == 2 and snap2["n_labels"] == 3
    listing = hub.client.get("/v1/snapshots", headers=hub.trainer).json()
    assert [s["version"] for s in listing["snapshots"]] == [1, 2]


def test_a_snapshot_lists_its_frames_in_image_order_whatever_their_case_ids(hub: HubHarness) -> None:
    """The trainer's order is the manifest's: by image, so the same labeled frames under other case ids (another
    run of one demo seed) make the same manifest order and the retrain repeats."""
    ids = [hub.send_case("d1", case_id=f"c-{n}") for n in ("zz", "aa", "mm", "bb", "yy")]  # ids out of image order
    for i, case_id in enumerate(ids):
        hub.label(case_id, i % 3)
    snap = hub.client.post("/v1/snapshots", headers=hub.trainer).json()
    _, entries = decode_manifest(hub.client.get(f"/v1/snapshots/{snap['snapshot_id']}/manifest",
                                                headers=hub.trainer).content)
    shas = [e.case.image_sha256 for e in entries]
    assert len(shas) == 5 and shas == sorted(shas)
    assert [e.case_id for e in entries] != sorted(ids)  # (the ids' order differs: this test shows something)


def test_blob_download_single_and_bulk(hub: HubHarness) -> None:
    case, image = hub.make_case("d1")
    assert hub.post_case(case, image).status_code == 201
    r = hub.client.get(f"/v1/blobs/{case.image_sha256}", headers=hub.trainer)
    assert r.status_code == 200 and r.content == image and r.headers["content-type"] == "image/png"
    missing = "f" * 64
    r = hub.client.post("/v1/blobs/bulk", json={"sha256s": [case.image_sha256, missing]}, headers=hub.trainer)
    assert r.status_code == 200 and r.headers["x-missing"] == missing and r.headers["x-missing-count"] == "1"
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        names = tar.getnames()
        assert names == [f"{case.image_sha256}.png"]
        assert tar.extractfile(names[0]).read() == image  # type: ignore[union-attr]


def test_blob_names_must_be_hashes(hub: HubHarness) -> None:
    assert hub.client.get("/v1/blobs/..%2F..%2Fetc%2Fpasswd", headers=hub.trainer).status_code in (400, 404)
    r = hub.client.get("/v1/blobs/abc", headers=hub.trainer)
    assert r.status_code == 400 and "sha256" in r.json()["detail"]
    r = hub.client.post("/v1/blobs/bulk", json={"sha256s": ["../../x"]}, headers=hub.trainer)
    assert r.status_code == 422
    assert hub.client.get(f"/v1/blobs/{'0' * 64}", headers=hub.trainer).status_code == 404


def test_devices_cannot_read_snapshots_or_blobs(hub: HubHarness) -> None:
    assert hub.client.post("/v1/snapshots", headers=hub.devices["d1"]).status_code == 403
    assert hub.client.get(f"/v1/blobs/{'0' * 64}", headers=hub.devices["d1"]).status_code == 403


def test_a_snapshot_of_no_labels_is_refused_and_takes_no_version(hub: HubHarness) -> None:
    """Training on a hub with nothing labeled used to freeze an empty snapshot (a version number and a manifest)
    that the trainer then refused: now the hub says why, and writes nothing."""
    r = hub.client.post("/v1/snapshots", json={"name": "too-early"}, headers=hub.trainer)
    assert r.status_code == 409, r.text
    assert r.json()["detail"] == ("nothing to snapshot: the hub holds no accepted or gold labels yet (0 case(s), "
                                  "0 of them held without a consensus); label cases first")
    a, b = hub.send_case("d1"), hub.send_case("d1")
    hub.label(a, 0, gold=1)  # a wrong answer to a gold task: held, never trained on
    r = hub.client.post("/v1/snapshots", headers=hub.trainer)
    assert r.status_code == 409 and "(2 case(s), 1 of them held without a consensus)" in r.json()["detail"]
    assert hub.client.get("/v1/snapshots", headers=hub.trainer).json()["snapshots"] == []
    hub.label(b, 2)
    snap = hub.client.post("/v1/snapshots", headers=hub.trainer).json()
    assert (snap["snapshot_id"], snap["version"], snap["n_labels"]) == ("snap-00001", 1, 1)
