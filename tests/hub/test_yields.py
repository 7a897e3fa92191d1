"""Per-trigger yield (fleet.hub.yields): which campaign triggers' uploads were model errors once labeled, in the
API, in /metrics and in `flywheel campaigns yield`, with hand-counted figures."""

from __future__ import annotations

from typing import Any

import pytest

from fleet.hub.yields import boxes_differ
from fleet.protocol import TriggerHit, YieldReport
from tests.hub.conftest import HubHarness


def send(hub: HubHarness, campaign: str, triggers: list[str], *, predicted: int) -> str:
    """A case of ``campaign`` flagged by ``triggers``, on which the model predicted class ``predicted``."""
    probs = [0.1] * 3
    probs[predicted] = 0.8
    case, image = hub.make_case("d1", probs=probs, campaign_id=campaign, campaign_version=1,
                                triggers=[TriggerHit(t, 0.9, 0.5) for t in triggers])
    r = hub.post_case(case, image)
    assert r.status_code == 201, r.text
    return case.case_id


def yields(hub: HubHarness, **params: str) -> dict[tuple[str, str], tuple]:
    r = hub.client.get("/v1/yields", params=params, headers=hub.admin)
    assert r.status_code == 200, r.text
    return {(y.campaign_id, y.trigger): (y.uploads, y.labeled, y.errors, y.yield_, y.labels_per_error, y.bytes)
            for y in YieldReport.from_json(r.content).yields}


def test_yield_counts_errors_found_per_trigger_and_per_campaign(hub: HubHarness) -> None:
    hub.enroll("d1")
    # campaign "rare": 'entropy' flags 4 cases, 'novelty' 2 (one case both); labels say which were wrong
    a = send(hub, "rare", ["entropy"], predicted=0)
    b = send(hub, "rare", ["entropy"], predicted=1)
    c = send(hub, "rare", ["entropy", "novelty"], predicted=2)
    d = send(hub, "rare", ["entropy"], predicted=0)  # never labeled
    e = send(hub, "rare", ["novelty"], predicted=1)
    f = send(hub, "other", ["flicker"], predicted=0)
    sizes = {cid: hub.client.get(f"/v1/cases/{cid}", headers=hub.admin).json()["case"]["image_size"]
             for cid in (a, b, c, d, e, f)}
    r = hub.client.post("/v1/selections", json={"budget": 6, "strategy": "uncertainty"}, headers=hub.labeler)
    assert r.status_code in (200, 201), r.text
    for cid, label in ((a, 2), (b, 1), (c, 0), (e, 1), (f, 0)):  # a and c wrong; b, e and f right
        assert hub.label(cid, label).status_code in (200, 201)
    got = yields(hub)
    rare_bytes = sum(sizes[x] for x in (a, b, c, d, e))
    assert got[("rare", "*")] == (5, 4, 2, 0.5, 2.0, rare_bytes)
    assert got[("rare", "entropy")] == (4, 3, 2, 2 / 3, 1.5, sum(sizes[x] for x in (a, b, c, d)))
    assert got[("rare", "novelty")] == (2, 2, 1, 0.5, 2.0, sizes[c] + sizes[e])
    assert got[("other", "flicker")] == (1, 1, 0, 0.0, None, sizes[f])
    assert list(got)[:3] == [("other", "*"), ("other", "flicker"), ("rare", "*")]  # campaign, then "*" first
    assert set(yields(hub, campaign_id="other")) == {("other", "*"), ("other", "flicker")}
    assert hub.client.get("/v1/yields", params={"campaign_id": "bad id!"},
                          headers=hub.admin).status_code == 422
    # a campaign id the hub has never seen (a typo) is a 404, not an empty table; a campaign with no uploads yet
    # answers with no rows
    r = hub.client.get("/v1/yields", params={"campaign_id": "rar"}, headers=hub.admin)
    assert r.status_code == 404 and "unknown campaign 'rar'" in r.text, r.text
    spec = {"id": "quiet", "version": 1, "rule": {"trigger": "entropy", "above": 0.5},
            "budgets": {"global": {"rate_per_min": 60, "burst": 20}}}
    assert hub.client.post("/v1/campaigns", json={"spec": spec}, headers=hub.admin).status_code == 201
    assert yields(hub, campaign_id="quiet") == {}
    assert hub.client.get("/v1/yields", headers=hub.labeler).status_code == 403

    text = hub.client.get("/metrics", headers=hub.admin).text
    assert 'flywheel_trigger_errors{campaign="rare",trigger="entropy"} 2' in text
    assert 'flywheel_trigger_yield{campaign="rare",trigger="novelty"} 0.5' in text
    assert 'flywheel_trigger_uploads{campaign="rare",trigger="*"} 5' in text


def test_metrics_count_the_yields_at_most_once_a_minute_and_say_how_old_they_are(hub: HubHarness) -> None:
    """A scrape every few seconds scanned every campaign case each time (5 s a scrape at a million cases:
    benchmarks/bench_yields.py): /metrics reads yields counted at most FLYWHEEL_HUB_METRICS_YIELDS_MAX_AGE_S (60)
    ago in its worker, and their age; GET /v1/yields always counts afresh."""
    hub.enroll("d1")
    a = send(hub, "rare", ["entropy"], predicted=0)
    b = send(hub, "rare", ["entropy"], predicted=1)
    assert hub.client.post("/v1/selections", json={"budget": 2, "strategy": "uncertainty"},
                           headers=hub.labeler).status_code in (200, 201)

    def scrape() -> str:
        r = hub.client.get("/metrics", headers=hub.admin)
        assert r.status_code == 200, r.text
        return r.text

    first = scrape()
    assert 'flywheel_trigger_labeled{campaign="rare",trigger="entropy"} 0' in first
    assert "\nflywheel_trigger_yields_age_seconds 0\n" in first
    assert hub.label(a, 2).status_code in (200, 201)  # a wrong: the model said 0
    hub.clock.advance(59)
    stale = scrape()
    assert 'flywheel_trigger_labeled{campaign="rare",trigger="entropy"} 0' in stale  # counted 59 s ago
    assert "\nflywheel_trigger_yields_age_seconds 59\n" in stale
    assert yields(hub)[("rare", "entropy")][:3] == (2, 1, 1)  # the API: now
    hub.clock.advance(2)
    fresh = scrape()
    assert 'flywheel_trigger_labeled{campaign="rare",trigger="entropy"} 1' in fresh
    assert 'flywheel_trigger_errors{campaign="rare",trigger="entropy"} 1' in fresh
    assert "\nflywheel_trigger_yields_age_seconds 0\n" in fresh
    assert hub.label(b, 1).status_code in (200, 201)
    assert 'flywheel_trigger_labeled{campaign="rare",trigger="entropy"} 1' in scrape()  # within the minute again


def test_metrics_count_the_yields_at_every_scrape_with_no_max_age(hub_factory: Any) -> None:
    hub: HubHarness = hub_factory(metrics_yields_max_age_s=0)
    hub.register_model("m1", promote=True)
    hub.enroll("d1")
    a = send(hub, "rare", ["entropy"], predicted=0)
    assert hub.client.post("/v1/selections", json={"budget": 1, "strategy": "uncertainty"},
                           headers=hub.labeler).status_code in (200, 201)
    assert 'flywheel_trigger_labeled{campaign="rare",trigger="entropy"} 0' in hub.client.get(
        "/metrics", headers=hub.admin).text
    assert hub.label(a, 0).status_code in (200, 201)
    assert 'flywheel_trigger_labeled{campaign="rare",trigger="entropy"} 1' in hub.client.get(
        "/metrics", headers=hub.admin).text


def test_the_databases_counts_match_each_cases_json(hub: HubHarness) -> None:
    """Uploads and bytes are counted in SQL (SQLite's json_each, PostgreSQL's json_array_elements): over 60 cases
    of three campaigns with random trigger hits, one name twice in a case and one case with none, they match a
    count made here from each case's own JSON, and the labeled columns still come from the accepted labels."""
    import random

    hub.enroll("d1")
    rng = random.Random(7)
    sent: dict[str, tuple[str, list[str], int]] = {}
    for i in range(60):
        campaign = ("rare", "night", "fog")[i % 3]
        names = rng.sample(["entropy", "novelty", "margin", "flicker"], rng.randint(0, 3))
        if i == 5:
            names = ["entropy", "entropy"]  # the same trigger twice: the case counts once for it
        predicted = rng.randrange(3)
        sent[send(hub, campaign, names, predicted=predicted)] = (campaign, names, predicted)
    r = hub.client.post("/v1/selections", json={"budget": 20, "strategy": "random"}, headers=hub.labeler)
    assert r.status_code in (200, 201), r.text
    labels = {c["case"]["case_id"]: rng.randrange(3) for c in r.json()["cases"]}
    for cid, label in labels.items():
        assert hub.label(cid, label).status_code in (200, 201)
    expected: dict[tuple[str, str], list[int]] = {}
    for cid, (campaign, names, predicted) in sent.items():
        size = hub.client.get(f"/v1/cases/{cid}", headers=hub.admin).json()["case"]["image_size"]
        for name in {"*", *names}:
            row = expected.setdefault((campaign, name), [0, 0, 0, 0])
            row[0] += 1
            row[1] += size
            if cid in labels:
                row[2] += 1
                row[3] += int(labels[cid] != predicted)
    got = {k: [v[0], v[5], v[1], v[2]] for k, v in yields(hub).items()}
    assert got == expected
    assert got[("rare", "entropy")][0] >= 1 and sum(v[2] for v in got.values()) > 0
    # the dashboard's uploads per trigger and per campaign, counted the same way
    from fleet.hub.db import read_session
    from fleet.hub.ui.figures import uploads

    with read_session(hub.hub.engine) as s:
        up = uploads(s, now=hub.clock())
    per_trigger = {t: sum(v[0] for (_, name), v in expected.items() if name == t) for _, t in expected if t != "*"}
    assert dict(up.by_trigger) == per_trigger and up.total == 60
    assert dict(up.by_campaign) == {f"{c} v1": 20 for c in ("rare", "night", "fog")}


def test_a_detectors_cases_count_as_errors_by_their_boxes_beside_a_classifiers(hub: HubHarness) -> None:
    """A detector's labeled cases are errors when the human's boxes differ from the model's at its operating
    threshold (0.5 here); a classifier's in the same pool by their class, each counted once per campaign."""
    from fleet.protocol import Box
    from tests.hub.test_detect_cases import box_label, frame_png, register_detector
    from tests.support.cases import make_detect_case

    hub.enroll("d1")
    register_detector(hub, "det1")
    png = frame_png()
    car, faint = Box(0.1, 0.1, 0.4, 0.4, 0, 0.9), Box(0.6, 0.6, 0.9, 0.9, 1, 0.3)  # faint: under the threshold
    cases = {  # case: (the model's boxes, its triggers, the human's boxes)
        "agree": ([car], ["box_flicker"], [car]),
        "faint-missed": ([car, faint], ["box_flicker", "box_ambiguity"], [car, faint]),  # an error: one missed
        "faint-absent": ([car, faint], ["box_ambiguity"], [car]),  # right: the faint box is not reported
        "wrong-class": ([car], ["box_ambiguity"], [Box(car.x1, car.y1, car.x2, car.y2, 2)]),
        "unlabeled": ([car], ["box_flicker"], None),
    }
    for cid, (boxes, triggers, _) in cases.items():
        case = make_detect_case(case_id=cid, device_id="d1", model_version="det1", boxes=boxes, image=png,
                                campaign_id="boxes", campaign_version=1,
                                triggers=[TriggerHit(t, 1.0, 0.5) for t in triggers])
        assert hub.post_case(case, png).status_code == 201
    right = send(hub, "boxes", ["entropy"], predicted=1)  # a classifier's case in the same campaign, labeled right
    for cid, (_, _, human) in cases.items():
        if human is not None:
            r = box_label(hub, cid, [[b.x1, b.y1, b.x2, b.y2, b.label] for b in human])
            assert r.status_code in (200, 201), r.text
    assert hub.label(right, 1).status_code in (200, 201)
    got = {k: v[:3] for k, v in yields(hub, campaign_id="boxes").items()}
    assert got == {("boxes", "*"): (6, 5, 2), ("boxes", "box_flicker"): (3, 2, 1),
                   ("boxes", "box_ambiguity"): (3, 3, 2), ("boxes", "entropy"): (1, 1, 0)}


def test_a_detection_is_wrong_when_a_box_is_missed_added_or_of_another_class() -> None:
    car = {"x1": 0.1, "y1": 0.1, "x2": 0.4, "y2": 0.4, "label": 0}
    person = {"x1": 0.5, "y1": 0.5, "x2": 0.9, "y2": 0.9, "label": 1}
    nudged = {**car, "x2": 0.42}  # IoU 0.93 with car: the same object
    assert not boxes_differ([car, person], [person, nudged])
    assert not boxes_differ([], [])
    assert boxes_differ([car], [car, person])  # missed
    assert boxes_differ([car, person], [car])  # added
    assert boxes_differ([car], [])
    assert boxes_differ([{**car, "label": 1}], [car])  # class flip
    assert boxes_differ([{**car, "x1": 0.3}], [car])  # IoU 0.33 < 0.5: not the same box


@pytest.mark.parametrize("as_json", [False, True])
def test_the_cli_prints_the_yields(hub: HubHarness, as_json: bool) -> None:
    pytest.importorskip("typer")
    from typer.testing import CliRunner

    import fleet.hub.admin_cli as admin_cli

    hub.enroll("d1")
    cid = send(hub, "rare", ["entropy"], predicted=0)
    hub.client.post("/v1/selections", json={"budget": 1, "strategy": "uncertainty"}, headers=hub.labeler)
    hub.label(cid, 2)

    def request(method: str, url: str, **kw: object) -> object:  # the CLI's httpx call, into the in-process hub
        path = url.split("://", 1)[1].split("/", 1)[1]
        kw.pop("timeout", None)
        return hub.client.request(method, "/" + path, **kw)  # type: ignore[arg-type]

    import httpx

    orig = httpx.request
    httpx.request = request  # type: ignore[assignment]
    try:
        token = hub.settings.admin_token.get_secret_value()
        run = CliRunner().invoke(admin_cli.campaigns_app, ["yield", "rare", "--hub", "http://hub.test", "--token",
                                                           token, *(["--json"] if as_json else [])])
    finally:
        httpx.request = orig  # type: ignore[assignment]
    assert run.exit_code == 0, run.output
    if as_json:
        report = YieldReport.from_json(run.output)
        assert [(y.trigger, y.errors, y.yield_) for y in report.yields] == [("*", 1, 1.0), ("entropy", 1, 1.0)]
    else:
        lines = run.output.splitlines()
        assert lines[0].startswith("campaign\ttrigger\tuploads\tlabeled\terrors\tyield")
        assert lines[2].split("\t")[:7] == ["rare", "entropy", "1", "1", "1", "1.00", "1.0"]
