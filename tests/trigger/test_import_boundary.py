"""trigger/ runs on devices: importing it must load numpy and the standard library only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

FORBIDDEN = {"torch", "torchvision", "onnxruntime", "sqlmodel", "fastapi", "label_studio_sdk", "httpx"}
ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv" / "bin" / "python"


def test_import_trigger_loads_no_heavy_module() -> None:
    python = str(PYTHON) if PYTHON.exists() else sys.executable
    out = subprocess.run(
        [python, "-c", "import trigger, sys; print(sorted(sys.modules))"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    loaded = {name.split(".")[0] for name in ast.literal_eval(out.stdout.strip().splitlines()[-1])}
    assert "trigger" in loaded
    assert not loaded & FORBIDDEN, f"import trigger loaded {sorted(loaded & FORBIDDEN)}"


def test_trigger_sources_import_only_numpy_and_the_standard_library() -> None:
    allowed = set(sys.stdlib_module_names) | {"numpy", "trigger"}
    for path in sorted((ROOT / "trigger").glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
