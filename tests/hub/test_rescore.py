"""Re-scoring the pool with the active model (fleet.hub.rescore): scores and embeddings per (case, model
version), selection in one model's space across several model versions, resumable, faults noted once."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlmodel import Session, select

from fleet.hub.models import CaseRow, CaseScore
from fleet.hub.rescore import decode_image
from fleet.hub.selection import box_informativeness, informativeness
from fleet.inference.runtime import ModelRuntime
from fleet.protocol import Box, RescoreProgress, Selection
from fleet.signing import load_private_key
from tests.hub.conftest import HubHarness, png_bytes
from tests.hub.test_detect_cases import frame_png, register_detector
from tests.support.cases import make_detect_case
from tests.support.detectors import make_detector_files


def rescore(hub: HubHarness, version: str, **body: Any) -> RescoreProgress:
    r = hub.client.post(f"/v1/models/{version}/rescore", json=body, headers=hub.labeler)
    assert r.status_code == 200, r.text
    return RescoreProgress.from_json(r.content)


def select_(hub: HubHarness, budget: int, strategy: str = "uncertainty") -> Selection:
    r = hub.client.post("/v1/selections", json={"budget": budget, "strategy": strategy, "seed": 0},
                        headers=hub.labeler)
    assert r.status_code == 200, r.text
    return Selection.from_json(r.content)


def scores(hub: HubHarness, version: str) -> dict[str, CaseScore]:
    with Session(hub.hub.engine) as s:
        return {r.case_id: r for r in s.exec(select(CaseScore).where(CaseScore.model_version == version)).all()}


def expected_scores(hub: HubHarness, version: str, cases: dict[str, bytes]) -> dict[str, float]:
    """What ``version`` makes of each case: its informativeness from its own softmax (the capturing model's class
    is no vote: fleet.hub.rescore's rules), computed here from the model file and the images as the device would."""
    files = hub.model_files(version, **VERSIONS[version])
    rt = ModelRuntime(files.onnx_path, files.manifest)
    ids = list(cases)
    out = rt.run([np.asarray(Image.open(io.BytesIO(cases[c]))) for c in ids])
    probs = np.exp(out.logits - out.logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    u = informativeness(probs, human=np.full(len(ids), -1))
    return dict(zip(ids, u.tolist(), strict=True))


VERSIONS: dict[str, dict[str, Any]] = {"m1": {}, "m2": {"seed": 1, "embedding_dim": 8},
                                       "m3": {"seed": 2, "embedding_dim": 12}}


def send(hub: HubHarness, n: int, version: str, *, seed: int) -> dict[str, bytes]:
    """``n`` cases captured by ``version`` -> {case id: its image}."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        probs = rng.dirichlet(np.ones(3)).tolist()
        image = png_bytes(seed * 1000 + i)
        emb = rng.normal(size=VERSIONS[version].get("embedding_dim", 16)).astype(np.float32)
        out[hub.send_case("d1", model_version=version, probs=probs, image=image, embedding=emb)] = image
    return out


def promote(hub: HubHarness, version: str) -> None:
    hub.register_model(version, promote=True, **VERSIONS[version])


def test_selection_crosses_model_versions_in_the_active_models_space(hub: HubHarness) -> None:
    old = send(hub, 12, "m1", seed=1)
    first = select_(hub, 3)
    assert first.model_version == "m1" and first.not_rescored == 0  # m1 captured them: its own scores
    for c in first.cases:
        hub.client.post(f"/v1/cases/{c.case.case_id}/release", headers=hub.labeler)

    promote(hub, "m2")  # m2 active: every case so far is m1's, none re-scored yet
    before = select_(hub, 2)
    assert before.model_version == "m2" and before.not_rescored == 12 and len(before.cases) == 2
    for c in before.cases:  # not re-scored: ranked by their capture-time score, after any re-scored case
        hub.client.post(f"/v1/cases/{c.case.case_id}/release", headers=hub.labeler)

    part = rescore(hub, "m2", limit=5, batch=2)  # resumable: a bounded call, then the rest
    assert (part.scored, part.failed, part.remaining) == (5, 0, 7)
    rest = rescore(hub, "m2", limit=1000)
    assert (rest.scored, rest.failed, rest.remaining) == (7, 0, 0)
    assert rescore(hub, "m2").scored == 0  # nothing twice

    stored = scores(hub, "m2")
    want = expected_scores(hub, "m2", old)
    assert set(stored) == set(old)
    for cid, row in stored.items():
        assert row.embedding_dim == 8 and len(row.embedding or b"") == 16 and row.error is None
        assert row.uncertainty == pytest.approx(want[cid], abs=1e-5)

    new = send(hub, 4, "m2", seed=2)  # captured by m2: in its space without re-scoring
    sel = select_(hub, 6)
    assert sel.model_version == "m2" and sel.not_rescored == 0 and sel.pool_size == 16
    in_space = {**want, **{cid: u for cid, u in _own(hub, new).items()}}
    best = sorted(in_space, key=lambda c: (-in_space[c], c))[:6]
    assert [c.case.case_id for c in sel.cases] == best  # ranked by m2's scores, not m1's
    for c in sel.cases:  # and the labeling side sees m2's score
        assert c.uncertainty == pytest.approx(in_space[c.case.case_id], abs=1e-6)

    promote(hub, "m3")  # a third version: m2's scores stay, unused
    assert select_(hub, 1).not_rescored == 10
    done = rescore(hub, "m3", limit=100)
    assert done.scored == 16 and done.remaining == 0  # the 6 queued and the 10 unlabeled, m1's and m2's
    assert {r.embedding_dim for r in scores(hub, "m3").values()} == {12}
    assert len(scores(hub, "m2")) == 12


def _own(hub: HubHarness, cases: dict[str, Any]) -> dict[str, float]:
    with Session(hub.hub.engine) as s:
        return {r.case_id: r.uncertainty for r in s.exec(select(CaseRow)).all() if r.case_id in cases}


def test_labeled_cases_are_rescored_after_the_pool_for_dedup_in_one_space(hub: HubHarness) -> None:
    cases = send(hub, 5, "m1", seed=3)
    labeled = next(iter(cases))
    sel = select_(hub, 5)
    assert labeled in {c.case.case_id for c in sel.cases}
    for c in sel.cases:
        if c.case.case_id == labeled:
            assert hub.label(labeled, 1).status_code in (200, 201)
        else:
            hub.client.post(f"/v1/cases/{c.case.case_id}/release", headers=hub.labeler)
    promote(hub, "m2")
    first = rescore(hub, "m2", limit=4)  # the pool first
    assert first.remaining == 1 and labeled not in scores(hub, "m2")
    assert rescore(hub, "m2").remaining == 0 and labeled in scores(hub, "m2")


def test_a_case_whose_image_is_gone_is_noted_once_and_selected_last(hub: HubHarness) -> None:
    cases = send(hub, 4, "m1", seed=4)
    gone = next(iter(cases))
    with Session(hub.hub.engine) as s:
        sha = s.get(CaseRow, gone).image_sha256  # type: ignore[union-attr]
    hub.hub.blobs.delete(sha)
    promote(hub, "m2")
    out = rescore(hub, "m2")
    assert (out.scored, out.failed, out.remaining) == (3, 1, 0)
    row = scores(hub, "m2")[gone]
    assert row.uncertainty is None and row.embedding is None and "image" in (row.error or "")
    assert rescore(hub, "m2").failed == 0  # not tried again
    sel = select_(hub, 4)
    assert sel.not_rescored == 1 and [c.case.case_id for c in sel.cases][-1] == gone


def test_rescore_refuses_an_unknown_model_and_bad_bounds(hub: HubHarness) -> None:
    r = hub.client.post("/v1/models/nope/rescore", json={}, headers=hub.labeler)
    assert r.status_code == 404 and "nope" in r.text
    r = hub.client.post("/v1/models/m1/rescore", json={"limit": 0}, headers=hub.labeler)
    assert r.status_code == 422 and "limit" in r.text
    r = hub.client.post("/v1/models/m1/rescore", json={}, headers=hub.devices["d1"])
    assert r.status_code == 403


def test_a_detector_pool_is_rescored_with_box_informativeness(hub: HubHarness) -> None:
    register_detector(hub, "det1")
    r = hub.client.post("/v1/models/det1/promote", headers=hub.admin, json={"override": True, "reason": "test"})
    assert r.status_code == 200, r.text
    image = frame_png()
    captured = Box(0.1, 0.1, 0.3, 0.3, 1, 0.6, [0.2, 0.6, 0.2])  # not what det2 will see: a disagreement
    case = make_detect_case(case_id="c-det", device_id="d1", model_version="det1", boxes=[captured], image=image,
                            captured_at=hub.clock(), embedding=np.ones(16, np.float32))
    assert hub.post_case(case, image).status_code == 201
    files = make_detector_files(hub.tmp / "models", "det2", private_key=load_private_key(hub.keypair.private_pem),
                                class_names=["red", "green", "blue"], embedding_dim=8)
    r = hub.client.post("/v1/models", headers=hub.trainer,
                        files={"onnx": ("model.onnx", files.onnx_path.read_bytes(), "application/octet-stream")},
                        data={"manifest": files.signed.to_json()})  # type: ignore[union-attr]
    assert r.status_code == 201, r.text
    r = hub.client.post("/v1/models/det2/promote", headers=hub.admin, json={"override": True, "reason": "test"})
    assert r.status_code == 200, r.text
    assert rescore(hub, "det2").scored == 1
    rt = ModelRuntime(files.onnx_path, files.manifest)
    det = rt.run([decode_image(image)]).detections
    assert det is not None and det.m >= 1  # det2 finds the squares
    from fleet.hub.ingest import detection_boxes
    from fleet.protocol import Detection

    want = box_informativeness(det, challenger=detection_boxes([Detection([captured])]),
                               floor=files.manifest.detector.operating_threshold)[0]  # type: ignore[union-attr]
    row = scores(hub, "det2")["c-det"]
    assert row.embedding_dim == 8 and row.uncertainty == pytest.approx(float(want), abs=1e-6)
    assert row.uncertainty >= 0.5  # the two versions' boxes differ


def test_decode_image_reads_every_stored_png_mode() -> None:
    for mode, shape in (("L", (5, 7)), ("RGB", (5, 7, 3)), ("RGBA", (5, 7, 4)), ("P", (5, 7, 3)), ("LA", (5, 7, 4)),
                        ("I;16", (5, 7))):
        img = Image.new(mode, (7, 5))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        assert decode_image(buf.getvalue()).shape == shape, mode


def test_the_rescore_command_goes_on_where_it_stopped(hub: HubHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from typer.testing import CliRunner

    from fleet.hub.cli import app

    send(hub, 6, "m1", seed=5)
    monkeypatch.setenv("FLYWHEEL_HUB_DEV", "1")
    # the command exports its --data-dir and --database-url for its workers: undone when the test ends
    monkeypatch.setenv("FLYWHEEL_HUB_DATA_DIR", str(hub.tmp))
    monkeypatch.setenv("FLYWHEEL_HUB_DATABASE_URL", str(hub.settings.database_url))
    args = ["rescore", "--batch", "4", "--data-dir", str(hub.tmp), "--database-url", str(hub.settings.database_url)]
    r = CliRunner().invoke(app, args)  # m1 is active and scored its own cases: nothing to do
    assert r.exit_code == 0 and json.loads(r.stdout.strip().splitlines()[-1])["scored"] == 0, r.output
    r = CliRunner().invoke(app, [*args, "--version", "nope"])
    assert r.exit_code == 1 and "nope" in r.output
    promote(hub, "m2")
    rescore(hub, "m2", limit=2)  # a run that stopped after two
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"version": "m2", "scored": 4, "failed": 0,
                                                             "remaining": 0}
    assert "4 re-scored" in r.output and len(scores(hub, "m2")) == 6


def test_selection_space_capture_keeps_each_cases_own_scores(hub_factory: Any) -> None:
    hub = hub_factory(selection_space="capture")  # the behaviour before re-scoring, for comparison runs
    hub.register_model("m1", promote=True)
    hub.enroll("d1")
    cases = send(hub, 6, "m1", seed=6)
    promote(hub, "m2")
    sel = select_(hub, 3)
    assert sel.model_version is None and sel.not_rescored == 0 and sel.pool_size == 6
    own = _own(hub, cases)
    assert [c.case.case_id for c in sel.cases] == sorted(own, key=lambda c: (-own[c], c))[:3]


def test_rescoring_keeps_the_probabilities_badge_selects_from_in_the_active_space(hub: HubHarness) -> None:
    """A re-scored classifier case keeps its class probabilities in the new model's space (as the model gives
    them); BADGE then selects from the re-scored and the newly captured cases alike, with gradients made in m2's
    space (m2's 8-wide embedding x 3 classes), never from m1's capture-time probabilities."""
    old = send(hub, 10, "m1", seed=5)
    promote(hub, "m2")
    assert rescore(hub, "m2", limit=100).scored == 10
    files = hub.model_files("m2", **VERSIONS["m2"])
    out = ModelRuntime(files.onnx_path, files.manifest).run(
        [np.asarray(Image.open(io.BytesIO(old[c]))) for c in old])
    want = np.exp(out.logits - out.logits.max(axis=1, keepdims=True))
    want /= want.sum(axis=1, keepdims=True)
    stored = scores(hub, "m2")
    for i, cid in enumerate(old):
        np.testing.assert_allclose(np.frombuffer(stored[cid].probs or b"", dtype="<f4"), want[i], atol=1e-5)
    new = send(hub, 4, "m2", seed=6)
    from fleet.hub.routes.cases import _with_probs

    ids = [*old, *new]
    ones = np.ones((len(ids), 8), np.float32)
    _, kept, got = _with_probs(hub.hub, "m2", [(c, 0.0, b"", "") for c in ids], ones, np.arange(len(ids)))
    with Session(hub.hub.engine) as s:
        captured = {r.case_id: r.payload["prediction"]["probs"] for r in s.exec(select(CaseRow)).all()}
    probs = np.vstack([want, [captured[c] for c in new]])  # m2's output for m1's cases, the capture for m2's
    assert kept.tolist() == list(range(len(ids)))
    np.testing.assert_allclose(got, probs, atol=1e-5)
    r = hub.client.post("/v1/selections", json={"budget": 14, "strategy": "badge", "seed": 0}, headers=hub.labeler)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "m2" and {c["case"]["case_id"] for c in body["cases"]} == set(old) | set(new)
