"""trigger/'s modules import each other one way: the package's internal import graph has no cycle.

Every import counts, wherever it stands (inside a function, under ``TYPE_CHECKING``), since a lazy
import is still an arrow between two modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "trigger"
ROOT = Path(__file__).resolve().parents[2]


def test_the_trigger_import_graph_has_no_cycle() -> None:
    graph = import_graph(ROOT / PACKAGE, PACKAGE)
    cycle = find_cycle(graph)
    assert cycle is None, f"trigger/ imports in a circle: {' -> '.join(cycle or [])}"


def test_the_graph_sees_every_kind_of_import() -> None:
    graph = import_graph(ROOT / PACKAGE, PACKAGE)
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
    graph = import_graph(pkg, "pkg")
    assert graph == {"pkg": set(), "pkg.high": {"pkg.low"}, "pkg.low": {"pkg.high"},
                     "pkg.other": {"pkg", "pkg.low"}}
    assert find_cycle(graph) in (["pkg.high", "pkg.low", "pkg.high"], ["pkg.low", "pkg.high", "pkg.low"])
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def import_graph(folder: Path, package: str) -> dict[str, set[str]]:
    """Module name -> the modules of ``package`` it imports (a flat package: ``folder/*.py``)."""
    modules = {package if p.stem == "__init__" else f"{package}.{p.stem}": p for p in folder.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                edges |= {_owner(alias.name, modules) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x / from .x import y
                    base = package + (f".{base}" if base else "")
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    edges.add(sub if sub in modules else _owner(base, modules))
        edges.discard("")
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path that ends where it starts, or None when the graph is acyclic."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            found = visit(nxt)
            if found:
                return found
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        found = visit(start)
        if found:
            return found
    return None


def _owner(dotted: str, modules: dict[str, Path]) -> str:
    """The longest prefix of ``dotted`` that is one of ``modules`` ("" for an outside module)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in modules:
            return ".".join(parts[:i])
    return ""
