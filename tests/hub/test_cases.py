"""Case ingest: idempotent, content-addressed, lineage kept, and every bad input refused whole."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlmodel import Session, col, func, select

from fleet.hub.models import Blob, CaseRow
from fleet.protocol import Case, CaseReceipt, Classification
from tests.hub.conftest import HubHarness, fresh_database, png_bytes


def _counts(hub: HubHarness) -> tuple[int, int, int]:
    with Session(hub.hub.engine) as s:
        cases = s.exec(select(func.count()).select_from(CaseRow)).one()
        blobs = s.exec(select(func.count()).select_from(Blob).where(Blob.kind == "image")).one()
        other = set(s.exec(select(Blob.sha256).where(Blob.kind != "image")).all())
    files = sum(1 for p in (hub.tmp / "blobs").rglob("*") if p.is_file() and p.name not in other)
    return cases, blobs, files


def test_ingest_stores_case_lineage_and_image_by_hash(hub: HubHarness) -> None:
    emb = np.linspace(-1, 1, 16).astype(np.float32)
    case, image = hub.make_case("d1", embedding=emb, campaign_id="rare", campaign_version=2, human=1,
                                scores={"entropy": 0.9})
    r = hub.post_case(case, image)
    assert r.status_code == 201, r.text
    receipt = CaseReceipt.from_json(r.content)
    assert (receipt.case_id, receipt.status, receipt.duplicate_of) == (case.case_id, "created", None)
    with Session(hub.hub.engine) as s:
        row = s.get(CaseRow, case.case_id)
    assert row is not None
    assert (row.device_id, row.model_version, row.campaign_id, row.campaign_version) == ("d1", "m1", "rare", 2)
    assert row.payload["triggers"] == [{"name": "entropy", "value": 0.9, "threshold": 0.5}]
    stored = Case.from_dict(row.payload)  # the case as the device sent it, its embedding kept beside it
    assert stored.human_action == Classification(1) and stored.embedding is None and row.task == "classify"
    assert row.state == "unlabeled" and row.embedding_dim == 16
    assert 0.0 < row.uncertainty <= 1.0
    assert hub.hub.blobs.get(hashlib.sha256(image).hexdigest()) == image


def test_ingest_is_idempotent_on_case_id(hub: HubHarness) -> None:
    case, image = hub.make_case("d1")
    assert hub.post_case(case, image).status_code == 201
    r = hub.post_case(case, image)
    assert r.status_code == 200 and CaseReceipt.from_json(r.content).status == "already"
    assert _counts(hub) == (1, 1, 1)


def test_same_case_id_from_another_device_is_a_conflict(hub: HubHarness) -> None:
    hub.enroll("d2")
    case, image = hub.make_case("d1", case_id="shared-id")
    assert hub.post_case(case, image).status_code == 201
    case2, image2 = hub.make_case("d2", case_id="shared-id")
    assert hub.post_case(case2, image2).status_code == 409


def test_same_image_from_two_devices_is_detected_by_hash(hub: HubHarness) -> None:
    hub.enroll("d2")
    image = png_bytes(42)
    first = hub.send_case("d1", image=image)
    case, _ = hub.make_case("d2", image=image)
    r = hub.post_case(case, image)
    assert r.status_code == 201 and r.json()["duplicate_of"] == first and r.json()["status"] == "duplicate"
    assert _counts(hub) == (2, 1, 1)  # one blob for both
    pool = hub.client.get("/v1/pool", params={"state": "duplicate"}, headers=hub.labeler).json()
    assert [c["case"]["case_id"] for c in pool["cases"]] == [case.case_id]


def test_case_json_as_a_file_part_is_accepted(hub: HubHarness) -> None:
    case, image = hub.make_case("d1")
    r = hub.client.post("/v1/cases", headers=hub.devices["d1"],
                        files={"case": ("case.json", case.to_json().encode(), "application/json"),
                               "image": ("f.png", image, "image/png")})
    assert r.status_code == 201, r.text


# ---------------------------------------------------------------------------------------------
# bad input: a clear 4xx, nothing half-written
# ---------------------------------------------------------------------------------------------


def _post_raw(hub: HubHarness, case_text: str, image: bytes) -> object:
    return hub.client.post("/v1/cases", headers=hub.devices["d1"], data={"case": case_text},
                           files={"image": ("f.png", image, "image/png")})


def _mutate(hub: HubHarness, **changes: object) -> tuple[str, bytes]:
    """The case's JSON with ``changes``; a key ``a__b`` sets ``d["a"]["b"]``."""
    case, image = hub.make_case("d1")
    d = json.loads(case.to_json())
    for key, value in changes.items():
        *path, last = key.split("__")
        node = d
        for part in path:
            node = node[part]
        node[last] = value
    return json.dumps(d), image


@pytest.mark.parametrize(
    ("changes", "status", "needle"),
    [
        ({"prediction__probs": [0.5, "x", 0.5]}, 422, "probs[1]"),
        ({"captured_at": "yesterday"}, 422, "captured_at"),
        ({"prediction__label": 7}, 422, "out of range"),
        ({"prediction__task": "segment"}, 422, "task must be one of"),
        ({"schema": 1}, 422, "schema 1 is not spoken here"),
        ({"model_version": "m-unknown"}, 422, "unknown model version"),
        ({"case_id": "../../etc/passwd"}, 422, "case_id"),
        ({"device_id": "d1/../d2"}, 422, "device_id"),
        ({"prediction__probs": [0.5, 0.5], "prediction__label": 0}, 422, "classes"),
        ({"image_size": 3}, 422, "image_size"),
        ({"image_sha256": "0" * 64}, 422, "sha256"),
        ({"surprise": 1}, 422, "unknown field"),
        ({"tags": {"k": 5}}, 422, "tags"),
    ],
)
def test_bad_case_fields_are_refused(hub: HubHarness, changes: dict[str, object], status: int, needle: str) -> None:
    text, image = _mutate(hub, **changes)
    r = _post_raw(hub, text, image)
    assert r.status_code == status, r.text  # type: ignore[attr-defined]
    assert needle in r.json()["detail"]  # type: ignore[attr-defined]
    assert _counts(hub) == (0, 0, 0)


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity"])
def test_nan_or_infinite_scores_are_refused(hub: HubHarness, bad: str) -> None:
    case, image = hub.make_case("d1")
    text = case.to_json().replace('"scores":{}', f'"scores":{{"entropy":{bad}}}')
    assert bad in text
    r = _post_raw(hub, text, image)
    assert r.status_code == 422 and "finite" in r.json()["detail"]  # type: ignore[attr-defined]
    assert _counts(hub) == (0, 0, 0)


def test_nan_embedding_is_refused(hub: HubHarness) -> None:
    emb = np.zeros(16, np.float32)
    emb[3] = np.nan
    case, image = hub.make_case("d1", embedding=emb)
    r = hub.post_case(case, image)
    assert r.status_code == 422 and "NaN" in r.json()["detail"]


def test_embedding_of_the_wrong_width_is_refused(hub: HubHarness) -> None:
    case, image = hub.make_case("d1", embedding=np.ones(8, np.float32))
    r = hub.post_case(case, image)
    assert r.status_code == 422 and "embedding_dim 16" in r.json()["detail"]


def test_malformed_case_json_is_refused(hub: HubHarness) -> None:
    r = _post_raw(hub, "{not json", png_bytes(1))
    assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]  # type: ignore[attr-defined]
    r = _post_raw(hub, "[1, 2]", png_bytes(1))
    assert r.status_code == 422 and "JSON object" in r.json()["detail"]  # type: ignore[attr-defined]


def test_non_image_payload_is_refused(hub: HubHarness) -> None:
    data = b"GIF89a" + b"\0" * 100
    case, _ = hub.make_case("d1", image=data)
    r = hub.post_case(case, data)
    assert r.status_code == 415 and "PNG" in r.json()["detail"]
    assert _counts(hub) == (0, 0, 0)


def test_truncated_png_is_refused(hub: HubHarness) -> None:
    data = png_bytes(5)[:-20]
    case, _ = hub.make_case("d1", image=data)
    r = hub.post_case(case, data)
    assert r.status_code == 415
    assert _counts(hub) == (0, 0, 0)


def test_oversized_image_is_refused(hub_factory: object) -> None:
    h = hub_factory(max_image_bytes=2048)  # type: ignore[operator]
    h.register_model("m1", promote=True)
    h.enroll("d1")
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (128, 128), dtype=np.uint8), mode="L").save(buf, format="PNG")
    big = buf.getvalue()
    assert len(big) > 2048
    case, _ = h.make_case("d1", image=big)
    r = h.post_case(case, big)
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert _counts(h) == (0, 0, 0)


def test_body_over_the_route_limit_is_413_even_without_content_length(hub_factory: object) -> None:
    h = hub_factory(max_image_bytes=1024, max_json_bytes=1024)  # type: ignore[operator]
    h.enroll("d1")

    def chunks() -> object:
        for _ in range(64):
            yield b"x" * 1024

    r = h.client.post("/v1/heartbeats", content=chunks(), headers={**h.devices["d1"],
                                                                    "Content-Type": "application/json"})
    assert r.status_code == 413


def test_missing_parts_are_named(hub: HubHarness) -> None:
    case, _ = hub.make_case("d1")
    r = hub.client.post("/v1/cases", headers=hub.devices["d1"], files={"case": (None, case.to_json())})
    assert r.status_code == 422 and "'image'" in r.json()["detail"]
    r = hub.client.post("/v1/cases", headers=hub.devices["d1"], data={"case": case.to_json()})
    assert r.status_code == 422 and "multipart/form-data" in r.json()["detail"]
    r = hub.client.post("/v1/cases", headers=hub.devices["d1"], json={"case": 1})
    assert r.status_code == 422


def test_a_failed_database_write_leaves_no_blob(hub: HubHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    import fleet.hub.ingest as ingest

    def boom(*a: object, **k: object) -> object:
        raise RuntimeError("database fell over")

    monkeypatch.setattr(ingest, "_store_row", boom)
    case, image = hub.make_case("d1")
    with pytest.raises(RuntimeError):
        hub.post_case(case, image)
    assert _counts(hub) == (0, 0, 0)


@pytest.mark.parametrize(
    "body",
    [b"--b\r\nContent-Disposition: form-data; name=\"case\"\r\n\r\n{}\r\n",  # no closing boundary
     b"--b\r\nno separator here\r\n--b--\r\n",
     b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--\r\n",  # no name
     b"garbage"],
)
def test_malformed_multipart_is_refused(hub: HubHarness, body: bytes) -> None:
    r = hub.client.post("/v1/cases", content=body,
                        headers={**hub.devices["d1"], "Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 400 and "multipart" in r.json()["detail"]
    assert _counts(hub) == (0, 0, 0)


def test_a_reused_case_id_with_other_content_is_409_and_leaves_no_blob(hub: HubHarness) -> None:
    """The leak of issue 13: 20 different images under one case id used to store 20 blobs."""
    hub.enroll("d2")
    first, image = hub.make_case("d1", case_id="reused")
    assert hub.post_case(first, image).status_code == 201
    for i in range(20):
        case, other = hub.make_case("d1", case_id="reused", image=png_bytes(500 + i, size=64))
        r = hub.post_case(case, other)
        assert r.status_code == 409 and "already stored with different content" in r.json()["detail"], r.text
        assert "image_sha256" in r.json()["detail"]
    for i in range(5):  # the same id from another device: refused before its image is written too
        case, other = hub.make_case("d2", case_id="reused", image=png_bytes(600 + i, size=64))
        assert hub.post_case(case, other).status_code == 409
    assert hub.post_case(first, image).status_code == 200  # the same case again is still a retry
    assert _counts(hub) == (1, 1, 1)


def test_a_case_id_that_races_in_after_the_check_leaves_no_blob(hub: HubHarness,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import fleet.hub.ingest as ingest

    first, image = hub.make_case("d1", case_id="raced")
    assert hub.post_case(first, image).status_code == 201
    real = ingest.stored_identity
    calls = []

    def miss_once(h: object, ids: list[str]) -> object:
        calls.append(ids)
        return {} if len(calls) == 1 else real(h, ids)  # type: ignore[arg-type]

    monkeypatch.setattr(ingest, "stored_identity", miss_once)
    case, other = hub.make_case("d1", case_id="raced", image=png_bytes(77))
    r = hub.post_case(case, other)
    assert r.status_code == 409 and "different content" in r.json()["detail"]
    assert len(calls) == 2 and _counts(hub) == (1, 1, 1)


def _states(hub: HubHarness, *case_ids: str) -> list[tuple[str, str | None]]:
    with Session(hub.hub.engine) as s:
        rows = {r.case_id: r for r in s.exec(select(CaseRow).where(col(CaseRow.case_id).in_(case_ids))).all()}
    return [(rows[c].state, rows[c].duplicate_of) for c in case_ids]


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
@pytest.mark.parametrize("order", ["plain-first", "telling-first"])
def test_the_pool_keeps_the_copy_that_says_most_whichever_arrives_first(hub: HubHarness, order: str,
                                                                        batch: bool) -> None:
    """Two devices upload one frame: d1's model was sure and the human agreed, d2's human contradicted the model
    (informativeness 0.9 and up). The pool keeps d2's copy in either arrival order, and answers each device so."""
    hub.enroll("d2")
    image = png_bytes(4242)
    plain, _ = hub.make_case("d1", image=image, probs=[0.8, 0.1, 0.1], human=0)
    telling, _ = hub.make_case("d2", image=image, probs=[0.8, 0.1, 0.1], human=2)
    first, second = (plain, telling) if order == "plain-first" else (telling, plain)
    receipts = {}
    for case in (first, second):
        if batch:
            r = hub.client.post("/v1/cases/batch", headers=hub.devices[case.device_id],
                                files=[("case_0", (None, case.to_json())), ("image_0", ("f.png", image, "image/png"))])
            assert r.status_code == 200, r.text
            receipts[case.case_id] = r.json()["results"][0]
        else:
            r = hub.post_case(case, image)
            assert r.status_code == 201, r.text
            receipts[case.case_id] = r.json()
    assert _states(hub, telling.case_id, plain.case_id) == [("unlabeled", None), ("duplicate", telling.case_id)]
    assert receipts[second.case_id]["status"] == ("created" if second is telling else "duplicate")
    assert receipts[second.case_id]["duplicate_of"] == (None if second is telling else telling.case_id)
    pool = hub.client.get("/v1/pool", headers=hub.labeler).json()
    assert [c["case"]["case_id"] for c in pool["cases"]] == [telling.case_id]


def test_a_kept_copy_once_queued_stays_kept_and_equal_copies_keep_the_first(hub: HubHarness) -> None:
    hub.enroll("d3")
    image = png_bytes(4343)
    first = hub.send_case("d1", image=image, probs=[0.8, 0.1, 0.1], human=0)
    same = hub.send_case("d1", image=image, probs=[0.8, 0.1, 0.1], human=0)  # alike but for id and time: first stays
    assert _states(hub, first, same) == [("unlabeled", None), ("duplicate", first)]
    r = hub.client.post("/v1/selections", json={"budget": 1, "strategy": "uncertainty"}, headers=hub.labeler)
    assert r.status_code == 200, r.text
    assert [c["case"]["case_id"] for c in r.json()["cases"]] == [first]
    late = hub.send_case("d3", image=image, probs=[0.8, 0.1, 0.1], human=2)  # says more, but too late
    assert _states(hub, first, same, late) == [("queued", None), ("duplicate", first), ("duplicate", first)]


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
def test_copies_that_score_alike_keep_the_same_one_whichever_arrives_first(
        hub: HubHarness, hub_factory: Any, backend: str, tmp_path: Path, sqlite_template: Path,
        pg_template: str | None, batch: bool) -> None:
    """Three devices upload one frame and their models were equally sure (informativeness 0.3 each): d1's human did
    nothing, d2's and d3's agreed with the model. Two hubs get the copies in opposite orders and keep the same one,
    with the human's action (re-scoring reads it: a later model may disagree with it). Before, each kept the first
    received, so two runs of a seeded demo re-scored different copies and parted (digits, 0.695 and 0.703 after
    turn 2)."""
    (tmp_path / "other").mkdir()
    url, cleanup = fresh_database(backend, tmp_path / "other", sqlite_template=sqlite_template,
                                  pg_template=pg_template)
    try:
        other = hub_factory(database_url=url, data_dir=tmp_path / "other")
        other.register_model("m1", promote=True)
        image = png_bytes(4444)
        copies = [hub.make_case(d, image=image, probs=[0.8, 0.1, 0.1], human=h)[0]
                  for d, h in (("d1", None), ("d2", 0), ("d3", 0))]
        kept = []
        for h, order in ((hub, copies), (other, copies[::-1])):
            for case in order:
                if case.device_id not in h.devices:
                    h.enroll(case.device_id)
                if batch:
                    r = h.client.post("/v1/cases/batch", headers=h.devices[case.device_id],
                                      files=[("case_0", (None, case.to_json())),
                                             ("image_0", ("f.png", image, "image/png"))])
                    assert r.status_code == 200 and r.json()["results"][0]["status"] in ("created", "duplicate")
                else:
                    assert h.post_case(case, image).status_code == 201
            pool = h.client.get("/v1/pool", headers=h.labeler).json()["cases"]
            assert len(pool) == 1
            kept.append(pool[0]["case"]["case_id"])
            states = _states(h, *(c.case_id for c in copies))
            assert sorted(states) == sorted([("unlabeled", None), ("duplicate", kept[-1]), ("duplicate", kept[-1])])
        assert kept[0] == kept[1]
        assert kept[0] in (copies[1].case_id, copies[2].case_id)  # a copy with the human's action
    finally:
        cleanup()
