"""The layers point one way (DESIGN.md section 2): fleet is the floor the other packages stand on, the edge, the
hub and the simulator are separate deployables, and no module imports another that imports it back."""

from __future__ import annotations

import pytest

from tests.support.imports import find_cycle, import_graph, module_files

GRAPH = import_graph(module_files())

# package -> the packages of ours it may import
ALLOWED = {"trigger": set(), "fleet": {"trigger"}, "labeling": {"fleet", "trigger"},
           "training": {"fleet", "trigger"}}
# within fleet: a part -> the parts it must never import
FLEET_APART = {"fleet.edge": ("fleet.hub", "fleet.sim"), "fleet.hub": ("fleet.edge", "fleet.sim"),
               "fleet.protocol": ("fleet.edge", "fleet.hub", "fleet.sim"),
               "fleet.errors": ("fleet.edge", "fleet.hub", "fleet.sim"),
               "fleet.retry": ("fleet.edge", "fleet.hub", "fleet.sim"),
               "fleet.inference": ("fleet.edge", "fleet.hub", "fleet.sim")}


def test_no_module_imports_one_that_imports_it_back() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, f"an import circle: {' -> '.join(cycle or [])}"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_the_layers_below_them(package: str) -> None:
    wrong = sorted(f"{a} -> {b}" for a, edges in GRAPH.items() if a.split(".")[0] == package for b in edges
                   if b.split(".")[0] not in ALLOWED[package] | {package})
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package])}: {wrong}"


@pytest.mark.parametrize("part", sorted(FLEET_APART))
def test_the_parts_of_fleet_stay_apart(part: str) -> None:
    wrong = sorted(f"{a} -> {b}" for a, edges in GRAPH.items() if a == part or a.startswith(part + ".")
                   for b in edges if b.startswith(FLEET_APART[part]))
    assert not wrong, wrong


def test_nothing_but_its_own_command_line_imports_training() -> None:
    users = sorted(a for a, edges in GRAPH.items() if not a.startswith("training") for b in edges
                   if b.startswith("training"))
    assert not users, users


def test_the_graph_sees_the_repository() -> None:
    assert {"fleet.hub.app", "labeling.bridge", "training.train", "trigger.evaluate"} <= set(GRAPH)
    assert "labeling.push" in GRAPH["labeling.bridge"] and "fleet.errors" in GRAPH["labeling.push"]
