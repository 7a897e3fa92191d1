"""Batch case ingest: one outcome per case, refused exactly like the single endpoint, idempotent per case id."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlmodel import Session, select

from fleet.hub.models import CaseRow
from fleet.protocol import BatchReceipt, Case, CaseReceipt
from tests.hub.conftest import HubHarness, png_bytes
from tests.hub.test_cases import _counts


def batch_files(items: list[tuple[str | Case, bytes]]) -> list[tuple[str, Any]]:
    files: list[tuple[str, Any]] = []
    for i, (case, image) in enumerate(items):
        text = case if isinstance(case, str) else case.to_json()
        files += [(f"case_{i}", (None, text)), (f"image_{i}", ("frame.png", image, "image/png"))]
    return files


def post_batch(hub: HubHarness, items: list[tuple[str | Case, bytes]], headers: dict[str, str] | None = None) -> Any:
    return hub.client.post("/v1/cases/batch", headers=headers or hub.devices["d1"], files=batch_files(items))


def statuses(r: Any) -> list[str]:
    assert r.status_code == 200, r.text
    return [x["status"] for x in r.json()["results"]]


def test_batch_stores_every_good_case_and_answers_each_one(hub: HubHarness) -> None:
    items = [hub.make_case("d1") for _ in range(5)]
    r = post_batch(hub, items)
    assert statuses(r) == ["created"] * 5
    assert [x["case_id"] for x in r.json()["results"]] == [c.case_id for c, _ in items]
    assert all(x["duplicate_of"] is None and x["error"] is None for x in r.json()["results"])
    assert BatchReceipt.from_json(r.content).results[0].status == "created"  # the contract's own type reads it
    assert _counts(hub) == (5, 5, 5)
    with Session(hub.hub.engine) as s:
        row = s.get(CaseRow, items[2][0].case_id)
    assert row is not None and row.device_id == "d1" and row.state == "unlabeled" and 0 < row.uncertainty <= 1
    assert hub.hub.blobs.get(items[2][0].image_sha256) == items[2][1]


def test_mixed_batch_good_bad_duplicate_and_repeated_ids(hub: HubHarness) -> None:
    before = hub.send_case("d1", image=png_bytes(7))  # stored earlier through the single endpoint
    good, good_image = hub.make_case("d1")
    unknown_model, um_image = hub.make_case("d1", model_version="m-unknown")
    gif = b"GIF89a" + b"\0" * 100
    not_png, _ = hub.make_case("d1", image=gif)
    same_image_as_before, sib_image = hub.make_case("d1", image=png_bytes(7))
    same_image_in_batch, _ = hub.make_case("d1", image=good_image)
    stored_before, sb_image = hub.make_case("d1", case_id=before, image=png_bytes(7))
    r = post_batch(hub, [
        (good, good_image),                    # 0 created
        (unknown_model, um_image),             # 1 rejected 422
        (not_png, gif),                        # 2 rejected 415
        ("{not json", png_bytes(1)),           # 3 rejected 422, no case id to report
        (same_image_as_before, sib_image),     # 4 duplicate of the case stored before
        (same_image_in_batch, good_image),     # 5 duplicate of item 0
        (good, good_image),                    # 6 the same case id again in this batch: already
        (stored_before, sb_image),             # 7 the hub already holds this case id: already
    ])
    res = r.json()["results"]
    assert statuses(r) == ["created", "rejected", "rejected", "rejected", "duplicate", "duplicate", "already",
                           "already"]
    assert res[1]["error_status"] == 422 and "unknown model version" in res[1]["error"]
    assert res[1]["case_id"] == unknown_model.case_id
    assert res[2]["error_status"] == 415 and "PNG" in res[2]["error"]
    assert res[3]["error_status"] == 422 and res[3]["case_id"] == ""
    assert res[4]["duplicate_of"] == before and res[5]["duplicate_of"] == good.case_id
    assert res[6]["case_id"] == good.case_id and res[6]["error"] is None
    assert _counts(hub) == (4, 2, 2)  # before, good, and the two duplicates; two images
    with Session(hub.hub.engine) as s:
        states = dict(s.exec(select(CaseRow.case_id, CaseRow.state)).all())
    assert states == {before: "unlabeled", good.case_id: "unlabeled", same_image_as_before.case_id: "duplicate",
                      same_image_in_batch.case_id: "duplicate"}


def test_a_whole_batch_sent_again_is_absorbed(hub: HubHarness) -> None:
    items = [hub.make_case("d1") for _ in range(4)]
    items.append(hub.make_case("d1", image=items[0][1]))
    first = post_batch(hub, items)
    assert statuses(first) == ["created"] * 4 + ["duplicate"]
    counts = _counts(hub)
    again = post_batch(hub, items)
    assert statuses(again) == ["already"] * 5
    assert _counts(hub) == counts == (5, 4, 4)


def test_a_device_cannot_send_a_case_claiming_another_device(hub: HubHarness) -> None:
    hub.enroll("d2")
    mine, image = hub.make_case("d1")
    theirs, their_image = hub.make_case("d2")
    r = post_batch(hub, [(theirs, their_image), (mine, image)], headers=hub.devices["d1"])
    assert statuses(r) == ["rejected", "created"]
    err = r.json()["results"][0]
    assert err["error_status"] == 403 and "'d1'" in err["error"] and "'d2'" in err["error"]
    with Session(hub.hub.engine) as s:
        assert s.get(CaseRow, theirs.case_id) is None


def test_a_case_id_held_by_another_device_is_a_conflict(hub: HubHarness) -> None:
    hub.enroll("d2")
    hub.send_case("d2", case_id="shared-id")
    case, image = hub.make_case("d1", case_id="shared-id")
    r = post_batch(hub, [(case, image), (case, image)])
    assert statuses(r) == ["rejected", "rejected"]
    assert [x["error_status"] for x in r.json()["results"]] == [409, 409]
    with Session(hub.hub.engine) as s:
        row = s.get(CaseRow, "shared-id")
    assert row is not None and row.device_id == "d2"


def test_admin_sending_one_case_id_for_two_devices_in_a_batch(hub: HubHarness) -> None:
    hub.enroll("d2")
    a, a_image = hub.make_case("d1", case_id="same")
    b, b_image = hub.make_case("d2", case_id="same")
    r = post_batch(hub, [(a, a_image), (b, b_image)], headers=hub.admin)
    assert statuses(r) == ["created", "rejected"] and r.json()["results"][1]["error_status"] == 409


@pytest.mark.parametrize(
    "changes",
    [{"prediction": {"task": "classify", "label": 0, "probs": [0.5, "x", 0.5]}},
     {"prediction": {"task": "classify", "label": 7, "probs": [0.5, 0.3, 0.2]}}, {"model_version": "m-unknown"},
     {"case_id": "../x"}, {"prediction": {"task": "classify", "label": 0, "probs": [0.5, 0.5]}}, {"image_size": 3},
     {"image_sha256": "0" * 64}, {"surprise": 1}],
)
def test_a_bad_case_gets_the_answer_the_single_endpoint_gives(hub: HubHarness, changes: dict[str, object]) -> None:
    case, image = hub.make_case("d1")
    d = json.loads(case.to_json())
    d.update(changes)
    text = json.dumps(d)
    single = hub.client.post("/v1/cases", headers=hub.devices["d1"], data={"case": text},
                             files={"image": ("f.png", image, "image/png")})
    good, good_image = hub.make_case("d1")
    r = post_batch(hub, [(text, image), (good, good_image)])
    assert statuses(r) == ["rejected", "created"]
    got = r.json()["results"][0]
    assert (got["error_status"], got["error"]) == (single.status_code, single.json()["detail"])
    assert _counts(hub) == (1, 1, 1)


def test_an_oversized_image_is_refused_alone(hub_factory: Any) -> None:
    h: HubHarness = hub_factory(max_image_bytes=1024)
    h.register_model("m1", promote=True)
    h.enroll("d1")
    big = png_bytes(3, size=64)
    assert len(big) > 1024
    items = [h.make_case("d1", image=big), h.make_case("d1")]
    r = post_batch(h, items)
    assert statuses(r) == ["rejected", "created"] and r.json()["results"][0]["error_status"] == 413


# ---------------------------------------------------------------------------------------------
# the envelope: refused whole, nothing stored
# ---------------------------------------------------------------------------------------------


def test_malformed_envelopes_are_refused_whole(hub: HubHarness) -> None:
    case, image = hub.make_case("d1")
    other, other_image = hub.make_case("d1")
    headers = hub.devices["d1"]
    cases = [
        ({"files": {"case_0": (None, case.to_json())}}, 422, "pairs"),  # no image
        ({"files": {"case_0": (None, case.to_json()), "image_1": ("f.png", image, "image/png")}}, 422, "image_1"),
        ({"files": {"case": (None, case.to_json()), "image": ("f.png", image, "image/png")}}, 422, "case_i"),
        ({"files": batch_files([(case, image), (other, other_image)]) + [("extra", (None, "x"))]}, 422, "pairs"),
        ({"data": {"case_0": case.to_json()}}, 422, "multipart/form-data"),
        ({"json": [case.to_json()]}, 422, "multipart/form-data"),
        ({"content": b"--b--\r\n", "headers": {"Content-Type": "multipart/form-data; boundary=b"}}, 400,
         "multipart"),
    ]
    for kwargs, status, needle in cases:
        extra = kwargs.pop("headers", {})
        r = hub.client.post("/v1/cases/batch", headers={**headers, **extra}, **kwargs)
        assert r.status_code == status, (kwargs, r.text)
        assert needle in r.json()["detail"], r.text
    assert _counts(hub) == (0, 0, 0)


def test_too_many_cases_or_bytes_refuse_the_whole_batch(hub_factory: Any) -> None:
    h: HubHarness = hub_factory(max_batch_cases=2, max_batch_bytes=8192)
    h.register_model("m1", promote=True)
    h.enroll("d1")
    r = post_batch(h, [h.make_case("d1") for _ in range(3)])
    assert r.status_code == 413 and "at most 2 cases" in r.json()["detail"]
    big = [h.make_case("d1", image=png_bytes(9 + i, size=64)) for i in range(2)]
    assert sum(len(image) for _, image in big) > 8192
    r = post_batch(h, big)
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert _counts(h) == (0, 0, 0)
    assert statuses(post_batch(h, [h.make_case("d1") for _ in range(2)])) == ["created", "created"]


def test_only_devices_may_send_batches(hub: HubHarness) -> None:
    case, image = hub.make_case("d1")
    assert hub.client.post("/v1/cases/batch", files=batch_files([(case, image)])).status_code == 401
    assert hub.client.post("/v1/cases/batch", headers=hub.labeler,
                           files=batch_files([(case, image)])).status_code == 403


def test_a_failed_database_write_leaves_no_blob_and_no_row(hub: HubHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    import fleet.hub.ingest_batch as ingest_batch

    kept = hub.send_case("d1", image=png_bytes(11))

    def boom(*a: object, **k: object) -> object:
        raise RuntimeError("database fell over")

    monkeypatch.setattr(ingest_batch, "_store_rows", boom)
    items = [hub.make_case("d1") for _ in range(3)] + [hub.make_case("d1", image=png_bytes(11))]
    with pytest.raises(RuntimeError):
        post_batch(hub, items)
    assert _counts(hub) == (1, 1, 1)  # the earlier case's blob is still referenced and kept
    with Session(hub.hub.engine) as s:
        assert s.get(CaseRow, kept) is not None


def test_the_same_batch_sent_concurrently_lands_once(hub: HubHarness) -> None:
    """Retries racing each other (PostgreSQL runs writers in parallel): each case id is created exactly once."""
    from concurrent.futures import ThreadPoolExecutor

    items = [hub.make_case("d1") for _ in range(12)]
    shuffled = [list(reversed(items)), items, items[3:] + items[:3], items]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda batch: post_batch(hub, batch), shuffled))
    created: dict[str, int] = {}
    for r in answers:
        for x in r.json()["results"]:
            assert x["status"] in ("created", "already"), x
            created[x["case_id"]] = created.get(x["case_id"], 0) + (x["status"] == "created")
    assert created == {c.case_id: 1 for c, _ in items}
    assert _counts(hub) == (12, 12, 12)


def test_what_the_edge_client_sends_the_hub_accepts(hub: HubHarness) -> None:
    """The device's HubClient.upload_cases against the real app: the wire contract holds end to end."""
    from fleet.edge.hubclient import HubClient
    from fleet.errors import InvalidInput

    token = hub.devices["d1"]["Authorization"].removeprefix("Bearer ")
    client = HubClient(hub.client, token=token)
    good = [hub.make_case("d1") for _ in range(3)]
    bad, bad_image = hub.make_case("d1", model_version="m-unknown")
    items = [(c.to_json(), image) for c, image in good] + [(bad.to_json(), bad_image), (good[0][0].to_json(),
                                                                                       good[0][1])]
    out = client.upload_cases(items)
    assert len(out) == 5
    assert [(x.case_id, x.status) for x in out[:3]] == [(c.case_id, "created") for c, _ in good]  # type: ignore[union-attr]
    assert isinstance(out[3], InvalidInput) and "unknown model version" in str(out[3])
    assert out[4] == CaseReceipt(good[0][0].case_id, "already")
    assert _counts(hub) == (3, 3, 3)


def test_reused_case_ids_with_other_content_leave_no_blob(hub: HubHarness) -> None:
    stored, image = hub.make_case("d1", case_id="kept")
    assert hub.post_case(stored, image).status_code == 201
    again = [hub.make_case("d1", case_id="kept", image=png_bytes(900 + i, size=48)) for i in range(5)]
    twin, twin_image = hub.make_case("d1", case_id="twin")
    twin2, twin2_image = hub.make_case("d1", case_id="twin", image=png_bytes(999, size=48))
    r = post_batch(hub, [*again, (twin, twin_image), (twin2, twin2_image), (stored, image)])
    assert statuses(r) == ["rejected"] * 5 + ["created", "rejected", "already"]
    errors = [x for x in r.json()["results"] if x["error"]]
    assert all(e["error_status"] == 409 and "different content" in e["error"] for e in errors), errors
    assert _counts(hub) == (2, 2, 2)
