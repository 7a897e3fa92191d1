"""trigger/'s modules import each other one way: the package's internal import graph has no cycle.

Every import counts, wherever it stands (inside a function, under ``TYPE_CHECKING``), since a lazy
import is still an arrow between two modules.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.imports import find_cycle, import_graph, module_files

PACKAGE = "trigger"


def test_the_trigger_import_graph_has_no_cycle() -> None:
    graph = import_graph(module_files(packages=(PACKAGE,)))
    cycle = find_cycle(graph)
    assert cycle is None, f"trigger/ imports in a circle: {' -> '.join(cycle or [])}"


def test_the_graph_sees_every_kind_of_import() -> None:
    graph = import_graph(module_files(packages=(PACKAGE,)))
    assert "trigger.evaluate" in graph["trigger"]  # the package re-exports its modules
    assert "trigger.spec" in graph["trigger.evaluate"]  # from trigger.spec import ...
    assert "trigger.scores" in graph["trigger.frames"]  # from trigger import scores
    assert "trigger.novelty" in graph["trigger.triggers"]  # under TYPE_CHECKING


def test_a_lazy_import_back_up_is_a_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from pkg import high\n    return high\n")
    (pkg / "high.py").write_text("from pkg.low import f\n")
    (pkg / "other.py").write_text("from pkg import low, f2\n")  # f2 is not a module: an arrow to pkg itself
    graph = import_graph(module_files(tmp_path, ("pkg",)))
    assert graph == {"pkg": set(), "pkg.high": {"pkg.low"}, "pkg.low": {"pkg.high"},
                     "pkg.other": {"pkg", "pkg.low"}}
    assert find_cycle(graph) in (["pkg.high", "pkg.low", "pkg.high"], ["pkg.low", "pkg.high", "pkg.low"])
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
