"""Import boundaries from DESIGN.md §2, checked the way well-kept libraries do: in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = {"torch", "torchvision", "sqlmodel", "fastapi", "label_studio_sdk", "sqlalchemy"}


def loaded_modules(code: str) -> set[str]:
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return {m.split(".")[0] for m in json.loads(out.stdout.strip().splitlines()[-1])}


@pytest.mark.parametrize(
    ("code", "forbidden"),
    [
        ("import fleet.protocol, fleet.errors", HEAVY | {"onnxruntime", "httpx", "cryptography"}),
        ("import fleet.signing", HEAVY | {"onnxruntime"}),
        ("import fleet.cli", HEAVY | {"onnxruntime"}),
        # the agent runs without PyAV unless a video source is used
        ("import fleet.edge.sources, fleet.edge.video, fleet.edge.avio, fleet.edge.config, fleet.edge.agent",
         HEAVY | {"av"}),
    ],
)
def test_light_modules_stay_light(code: str, forbidden: set[str]) -> None:
    assert not loaded_modules(code) & forbidden


def test_flywheel_help_lists_every_subcommand_without_importing_them() -> None:
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom fleet.cli import app, SUBCOMMANDS\n"
        "r = CliRunner().invoke(app, ['--help'])\nassert r.exit_code == 0, r.output\n"
        "missing = [n for n in SUBCOMMANDS if n not in r.output]\nassert not missing, missing\n"
    )
    assert not loaded_modules(code) & (HEAVY | {"onnxruntime"})


def test_unknown_subcommand_is_refused() -> None:
    from typer.testing import CliRunner

    from fleet.cli import app

    result = CliRunner().invoke(app, ["frobnicate"])
    assert result.exit_code == 2
    assert "No such command" in result.output


def test_a_video_source_without_pyav_names_the_extra_to_install(tmp_path: object) -> None:
    code = (
        "import sys\nsys.modules['av'] = None  # as if PyAV were not installed\n"
        "from fleet.edge.sources import open_source\nfrom fleet.errors import MissingExtra\n"
        "try:\n    open_source('video', '.')\nexcept MissingExtra as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "'av' is not installed; install it with: pip install 'edge-flywheel[video]'" in out.stdout
