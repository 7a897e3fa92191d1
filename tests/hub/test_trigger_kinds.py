"""An agent tells the hub which trigger kinds it evaluates (``GET /v1/assignment?triggers=...``), and gets each
campaign without the leaves it could not run: an ``any_of`` keeps its other children, an ``all_of`` with such a
leaf goes whole, budgets follow, a campaign with nothing left is not sent. An agent that says nothing gets
everything, as before. The agent side runs the real ``fleet.edge`` client against the hub, with a kind taken out
of its ``trigger`` package: an agent one release behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fleet.edge.campaigns import Campaigns
from fleet.protocol import Assignment
from tests.hub.conftest import HubHarness
from trigger import TRIGGERS, parse_spec

SPEC = {"id": "mix", "version": 1, "rule": {"any_of": [
    {"trigger": "entropy", "above": 0.5},
    {"all_of": [{"trigger": "margin", "below": 0.2}, {"trigger": "least_confidence", "above": 0.3}]},
    {"trigger": "energy", "above": 1.0},
]}, "budgets": {"global": {"rate_per_s": 1, "burst": 10}, "per_trigger": {
    "entropy": {"rate_per_s": 0.5, "burst": 5}, "energy": {"rate_per_s": 0.5, "burst": 5},
    "margin": {"rate_per_s": 0.5, "burst": 5}}}}


def served(hub: HubHarness, triggers: str | None) -> list[Any]:
    params = {} if triggers is None else {"triggers": triggers}
    r = hub.client.get("/v1/assignment", params=params, headers=hub.devices["d1"])
    assert r.status_code == 200, r.text
    return Assignment.from_json(r.content).campaigns


def test_campaigns_come_cut_to_the_kinds_the_agent_evaluates(hub: HubHarness) -> None:
    assert hub.client.post("/v1/campaigns", json={"spec": SPEC}, headers=hub.admin).status_code == 201
    full = parse_spec(SPEC).to_dict()
    assert [c.spec for c in served(hub, None)] == [full]  # said nothing: everything, as before
    assert [c.spec for c in served(hub, "entropy,margin,least_confidence,energy,novelty")] == [full]

    (cut,) = served(hub, "entropy,margin,energy")  # least_confidence missing: its all_of goes whole
    spec = parse_spec(cut.spec)
    assert cut.version == 1 and [leaf.trigger for leaf in spec.leaves] == ["entropy", "energy"]
    assert sorted(cut.spec["budgets"]["per_trigger"]) == ["energy", "entropy"]  # margin's budget went with it

    (alone,) = served(hub, "entropy")
    assert alone.spec["rule"] == {**full["rule"]["any_of"][0]} and list(alone.spec["budgets"]["per_trigger"]) == [
        "entropy"]
    assert served(hub, "margin,novelty") == []  # nothing it could run is left: not sent


@pytest.mark.parametrize("bad", ["Entropy", "entropy,,margin;drop", ",", "x" * 65])
def test_a_bad_trigger_list_is_refused_naming_it(hub: HubHarness, bad: str) -> None:
    r = hub.client.get("/v1/assignment", params={"triggers": bad}, headers=hub.devices["d1"])
    assert r.status_code == 422, r.text
    assert "triggers must be 1 to 256 comma-separated trigger kinds" in r.text and repr(bad[:200])[1:-1] in r.text


def test_an_agent_without_a_kind_runs_the_rest_of_the_campaign(hub: HubHarness, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent whose ``trigger`` package has no ``energy`` (a release before it) would refuse the whole campaign;
    it tells the hub what it has, and runs entropy and the margin-and-least-confidence rule."""
    from fleet.edge.hubclient import HubClient

    assert hub.client.post("/v1/campaigns", json={"spec": SPEC}, headers=hub.admin).status_code == 201
    monkeypatch.delitem(TRIGGERS, "energy")
    agent = HubClient(hub.client, token=hub.devices["d1"]["Authorization"].split()[1])
    camps = Campaigns(agent, tmp_path)
    (live,) = camps.apply(agent.get_assignment().campaigns)
    assert [leaf.trigger for leaf in live.evaluator.spec.leaves] == ["entropy", "margin", "least_confidence"]
    with pytest.raises(Exception, match="unknown trigger 'energy'"):  # what it would have been sent before
        parse_spec(SPEC)
