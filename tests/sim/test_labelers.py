"""The demo's label accounting: when a turn that spent less than its budget is a fault."""

from __future__ import annotations

import pytest

from fleet.sim.labelers import LabelRound, shortfall


def test_a_full_budget_is_not_short() -> None:
    assert shortfall(LabelRound(40, 40), budget=40, supply=500) == ("", False)
    assert shortfall(LabelRound(40, 40, ("a transient error, retried",)), budget=40, supply=500) == ("", False)


def test_a_small_pool_is_the_fleets_supply_not_a_fault() -> None:
    why, fault = shortfall(LabelRound(25, 25), budget=40, supply=25)
    assert not fault and "only 25 case(s)" in why


def test_a_selection_kept_small_by_dedup_is_not_a_fault() -> None:
    why, fault = shortfall(LabelRound(31, 31), budget=40, supply=500)
    assert not fault and "selected 31 of the 40" in why


@pytest.mark.parametrize("round_", [
    LabelRound(40, 0, ("push: Label Studio update project 1: HTTP 400: Validation error",)),  # the queue broke
    LabelRound(40, 12),  # selected, never labeled, nothing said why
    LabelRound(0, 0, ("push: Label Studio is down",)),  # nothing selected: still short of a full pool
    LabelRound(20, 20, ("Label Studio refused 20 task(s)",)),
])
def test_labels_short_of_what_the_pool_holds_are_a_fault(round_: LabelRound) -> None:
    why, fault = shortfall(round_, budget=40, supply=500)
    assert fault and f"labeled {round_.labeled} of 40" in why
    if round_.problems:
        assert round_.problems[0] in why
