"""The trigger package's public surface is pinned (like httpx's exported-members test), and every
module's ``__all__`` lists what it defines rather than hiding imports."""

from __future__ import annotations

import ast
import importlib
import types
from pathlib import Path

import trigger

ROOT = Path(__file__).resolve().parents[2]

EXPORTED = [
    "BoxComparison",
    "Boxes",
    "Budget",
    "Decision",
    "Evaluator",
    "FrameBatch",
    "NearDuplicateFilter",
    "NoveltyBank",
    "RateCalibrator",
    "Scores",
    "Spec",
    "SpecError",
    "TRIGGERS",
    "TokenBucket",
    "TriggerDef",
    "ambiguous_boxes",
    "bald",
    "batched_nms",
    "box_disagreement",
    "box_flicker",
    "box_instability",
    "box_iou",
    "box_uncertainty",
    "challenger_disagreement",
    "decode_dense",
    "dhash",
    "energy",
    "entropy",
    "hamming",
    "human_disagreement",
    "least_confidence",
    "localization_stability",
    "margin",
    "match_boxes",
    "parse_spec",
    "sample_rows",
    "softmax",
    "variation_ratio",
]

# modules whose job is to gather names defined elsewhere: the package, and the spec format's home
FACADES = {"trigger/__init__.py", "trigger/spec.py"}


def test_the_package_exports_exactly_its_public_surface() -> None:
    assert sorted(trigger.__all__) == EXPORTED
    assert len(set(trigger.__all__)) == len(trigger.__all__)


def test_every_exported_name_resolves() -> None:
    namespace: dict[str, object] = {}
    exec("from trigger import *", namespace)  # noqa: S102 - the star import is what __all__ is for
    for name in trigger.__all__:
        assert getattr(trigger, name) is namespace[name], name


def test_nothing_public_in_the_package_is_left_out() -> None:
    public = {
        name for name, value in vars(trigger).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(trigger.__all__)


def test_each_module_lists_only_what_it_defines() -> None:
    for path in sorted((ROOT / "trigger").glob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        name = "trigger" if path.stem == "__init__" else f"trigger.{path.stem}"
        module = importlib.import_module(name)
        exported = getattr(module, "__all__", None)
        if exported is None:
            assert path.stem.startswith("_"), f"{rel} is public and has no __all__"
            continue
        missing = [n for n in exported if not hasattr(module, n)]
        assert not missing, f"{rel}: __all__ names {missing}, which do not resolve"
        if rel not in FACADES:
            imported_only = sorted(set(exported) - _defined_at_top(path))
            assert not imported_only, f"{rel}: __all__ lists {imported_only}, which it only imports"


def _defined_at_top(path: Path) -> set[str]:
    """Names a module binds itself at top level (functions, classes, assignments)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names
