"""Budgets that follow yield (fleet.hub.autobudget): Thompson sampling's shares, and a campaign whose
per-trigger budgets are "auto" moving its upload shares towards the trigger whose uploads were model errors,
published as a new version that devices are assigned, with the total upload rate held."""

from __future__ import annotations

from typing import Any

import pytest

from fleet.hub.autobudget import FLOOR, thompson_shares
from fleet.protocol import Assignment, CampaignReceipt, TriggerHit
from tests.hub.conftest import HubHarness
from trigger.budget import Budget, TokenBucket


def test_shares_follow_the_posterior_chance_of_the_best_yield() -> None:
    even = thompson_shares({"a": (0, 0), "b": (0, 0)})
    assert even == pytest.approx({"a": 0.5, "b": 0.5}, abs=0.01)
    skew = thompson_shares({"a": (40, 36), "b": (40, 1)})
    assert skew["a"] == pytest.approx(FLOOR / 2 + (1 - FLOOR), abs=1e-3)  # a is best in every draw
    assert skew["b"] == pytest.approx(FLOOR / 2, abs=1e-3)  # never starved below the exploration floor
    close = thompson_shares({"a": (10, 5), "b": (10, 4), "c": (0, 0)})
    assert sum(close.values()) == pytest.approx(1.0) and close["a"] > close["b"] > FLOOR / 3
    assert close["c"] > close["b"]  # an untried trigger is uncertain enough to be tried
    with pytest.raises(ValueError, match="0 <= errors <= labeled"):
        thompson_shares({"a": (3, 4)})
    with pytest.raises(ValueError, match="floor must be in"):
        thompson_shares({"a": (3, 1)}, floor=1.5)


def spec(version: int = 1, per_trigger: Any = "auto") -> dict[str, Any]:
    return {"id": "mine", "version": version,
            "rule": {"any_of": [{"trigger": "entropy", "above": 0.1, "label": "unsure"},
                                {"trigger": "margin", "below": 0.9, "label": "close"}]},
            "budgets": {"global": {"rate_per_min": 60, "burst": 20}, "per_trigger": per_trigger}}


def per_trigger(c: CampaignReceipt) -> dict[str, float]:
    return {k: v["rate_per_s"] for k, v in c.spec["budgets"]["per_trigger"].items()}


def rebalance(hub: HubHarness, campaign_id: str = "mine") -> Any:
    return hub.client.post(f"/v1/campaigns/{campaign_id}/rebalance", headers=hub.admin)


def admitted(c: CampaignReceipt, stream: list[str], seconds: float) -> dict[str, int]:
    """Frames each trigger gets through the campaign's budgets (trigger.budget, as on the device) when
    ``stream`` (one trigger label per frame) arrives evenly over ``seconds``."""
    t = [0.0]
    b = c.spec["budgets"]
    budget = Budget(global_bucket=TokenBucket(b["global"]["rate_per_s"], b["global"]["burst"], clock=lambda: t[0]),
                    per_trigger={k: TokenBucket(v["rate_per_s"], v["burst"], clock=lambda: t[0])
                                 for k, v in b["per_trigger"].items()}, clock=lambda: t[0])
    out = {"unsure": 0, "close": 0}
    for i, name in enumerate(stream):
        t[0] = i * seconds / len(stream)
        if budget.try_acquire([name]):
            out[name] += 1
    return out


def test_an_auto_campaign_moves_its_budget_to_the_trigger_that_finds_errors(hub: HubHarness) -> None:
    r = hub.client.post("/v1/campaigns", json={"spec": spec()}, headers=hub.admin)
    assert r.status_code == 201, r.text
    v1 = CampaignReceipt.from_json(r.content)
    assert v1.auto_budgets and per_trigger(v1) == {"unsure": 0.5, "close": 0.5}  # even shares of 1 frame/s
    hub.enroll("d1")
    # the stream: 'unsure' uploads are model errors (labels differ), 'close' uploads are not
    for i in range(40):
        name = "unsure" if i % 2 == 0 else "close"
        case, image = hub.make_case("d1", probs=[0.8, 0.1, 0.1], campaign_id="mine", campaign_version=1,
                                    triggers=[TriggerHit(name, 0.9, 0.1)])
        assert hub.post_case(case, image).status_code == 201
    sel = hub.client.post("/v1/selections", json={"budget": 40, "strategy": "uncertainty"}, headers=hub.labeler)
    assert sel.status_code in (200, 201), sel.text
    for c in sel.json()["cases"]:
        wrong = c["case"]["triggers"][0]["name"] == "unsure"
        assert hub.label(c["case"]["case_id"], 1 if wrong else 0).status_code in (200, 201)

    r = rebalance(hub)
    assert r.status_code == 200, r.text
    v2 = CampaignReceipt.from_json(r.content)
    assert not v2.already and v2.version == 2 == v2.spec["version"] and v2.auto_budgets
    rates = per_trigger(v2)
    assert rates["unsure"] == pytest.approx(FLOOR / 2 + (1 - FLOOR), abs=0.01)  # 0.9 frames/s
    assert rates["close"] == pytest.approx(FLOOR / 2, abs=0.01)  # the exploration floor
    assert sum(rates.values()) == pytest.approx(1.0, abs=1e-6)  # the global rate, held
    # devices are assigned the new version
    a = Assignment.from_json(hub.client.get("/v1/assignment", headers=hub.devices["d1"]).content)
    assert [(c.campaign_id, c.version) for c in a.campaigns] == [("mine", 2)]
    # on the device, the same stream now spends most uploads on 'unsure'; the total stays the global rate
    stream = ["unsure", "close"] * 3000  # 2 frames/s of each for 1500 s, far above the 1 frame/s budget
    before, after = admitted(v1, stream, 1500.0), admitted(v2, stream, 1500.0)
    assert after["unsure"] > 1.6 * before["unsure"] and after["close"] < 0.3 * before["close"]
    assert sum(after.values()) == pytest.approx(sum(before.values()), rel=0.03)  # ~1520 = 20 + 1 * 1500
    # nothing new learned: no new version
    again = CampaignReceipt.from_json(rebalance(hub).content)
    assert again.already and again.version == 2


def test_rebalance_refuses_what_it_cannot_do(hub: HubHarness) -> None:
    fixed = spec(per_trigger={"unsure": {"rate_per_min": 30}, "close": {"rate_per_min": 30}})
    assert hub.client.post("/v1/campaigns", json={"spec": fixed}, headers=hub.admin).status_code == 201
    r = rebalance(hub)
    assert r.status_code == 422 and "has fixed budgets" in r.text
    assert rebalance(hub, "nobody").status_code == 404
    bare = spec(version=1)
    bare["id"] = "noglobal"
    del bare["budgets"]["global"]
    r = hub.client.post("/v1/campaigns", json={"spec": bare}, headers=hub.admin)
    assert r.status_code == 422 and 'budgets.per_trigger "auto" shares the global budget' in r.json()["detail"]
    assert hub.client.get("/v1/campaigns/noglobal", headers=hub.admin).status_code == 404  # nothing stored
    assert hub.client.post("/v1/campaigns/mine/rebalance", headers=hub.labeler).status_code == 403
