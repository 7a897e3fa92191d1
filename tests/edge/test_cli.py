from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fleet.edge.cli import app
from fleet.edge.spool import Spool
from tests.edge.conftest import Keys, assign, publish
from tests.support.inproc import InProcHub, inproc_hub

ROOT = Path(__file__).resolve().parents[2]
HEAVY = {"torch", "torchvision", "sqlmodel", "fastapi", "label_studio_sdk", "sqlalchemy"}


def loaded_modules(code: str) -> set[str]:
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    return {m.split(".")[0] for m in json.loads(out.stdout.strip().splitlines()[-1])}


def test_flywheel_agent_help_imports_nothing_heavy() -> None:
    code = (
        "from typer.testing import CliRunner\nfrom fleet.cli import app\n"
        "r = CliRunner().invoke(app, ['agent', '--help'])\n"
        "assert r.exit_code == 0 and 'enroll' in r.output and 'run' in r.output, r.output\n"
    )
    assert not loaded_modules(code) & (HEAVY | {"onnxruntime", "httpx", "sqlite3"})


def test_the_whole_edge_package_stays_off_server_and_training_libraries() -> None:
    mods = [p.stem for p in (ROOT / "fleet" / "edge").glob("*.py") if p.stem != "__init__"]
    code = "\n".join(f"import fleet.edge.{m}" for m in mods)
    assert not loaded_modules(code) & HEAVY


def test_agent_run_help_through_the_real_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "fleet.cli", "agent", "run", "--help"], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert "--max-frames" in out.stdout and "--config" in out.stdout


@pytest.fixture
def hub(tmp_path: Path, keys: Keys) -> Iterator[InProcHub]:
    """The real hub with no device enrolled yet (the CLI enrolls ``dev-1``), its fleet secret "fleet-secret"."""
    with inproc_hub(tmp_path, keys.pair, fleet_secret="fleet-secret") as h:
        yield h


def write_config(tmp_path: Path, url: str, **extra: str) -> Path:
    frames = np.random.default_rng(0).integers(0, 256, (32, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "frames.npz", images=frames, human=np.arange(32) % 3)
    text = f"""
device_id = "dev-1"
data_dir = "data"
[hub]
url = "{url}"
fleet_secret = "fleet-secret"
[source]
kind = "npz"
path = "frames.npz"
loop = {extra.get("loop", "false")}
fps = {extra.get("fps", "0")}
[heartbeat]
interval_s = {extra.get("heartbeat", "0.2")}
[ota]
poll_interval_s = 0.2
[uplink]
backoff_base_s = 0.05
backoff_max_s = 0.5
drain_timeout_s = 2
"""
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_enroll_refuses_bad_secret_and_pins_the_key(tmp_path: Path, hub: InProcHub, keys: Keys) -> None:
    runner = CliRunner()
    with hub.serve() as url:
        cfg = write_config(tmp_path, url)
        cfg.write_text(cfg.read_text().replace('fleet_secret = "fleet-secret"', 'fleet_secret = "wrong"'))
        r = runner.invoke(app, ["enroll", "--config", str(cfg)])
        assert r.exit_code == 2 and "HTTP 401" in r.output
        cfg.write_text(cfg.read_text().replace('fleet_secret = "wrong"', 'fleet_secret = "fleet-secret"'))
        r = runner.invoke(app, ["enroll", "--config", str(cfg)])
        assert r.exit_code == 0, r.output
        assert "enrolled dev-1" in r.output
        enrollment = json.loads((tmp_path / "data" / "enrollment.json").read_text())
        assert enrollment["fleet_public_key"] == keys.public_b64
        assert (tmp_path / "data" / "enrollment.json").stat().st_mode & 0o777 == 0o600
        r = runner.invoke(app, ["enroll", "--config", str(cfg)])
        assert r.exit_code == 2 and "already enrolled" in r.output
        r = runner.invoke(app, ["status", "--config", str(cfg)])
        assert r.exit_code == 0 and json.loads(r.output)["models"]["active"] is None


def test_enroll_refuses_a_hub_offering_another_key(tmp_path: Path, hub: InProcHub, other_keys: Keys) -> None:
    with hub.serve() as url:
        cfg = write_config(tmp_path, url)
        cfg.write_text(cfg.read_text().replace("[hub]\n", f'[hub]\nfleet_public_key = "{other_keys.public_b64}"\n'))
        r = CliRunner().invoke(app, ["enroll", "--config", str(cfg)])
        assert r.exit_code == 2 and "refusing to enroll" in r.output
        assert not (tmp_path / "data" / "enrollment.json").exists()


def test_run_without_enrollment_says_what_to_do(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "http://127.0.0.1:9")
    r = CliRunner().invoke(app, ["run", "--config", str(cfg), "--max-frames", "3"])
    assert r.exit_code == 2 and "flywheel agent enroll" in r.output


@pytest.mark.slow
def test_run_as_a_process_and_stop_cleanly_on_sigterm(tmp_path: Path, hub: InProcHub, make_model) -> None:
    v1 = make_model("v1")
    publish(hub, v1)
    assign(hub, v1)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with hub.serve() as url:
        cfg = write_config(tmp_path, url, loop="true", fps="200")
        subprocess.run([sys.executable, "-m", "fleet.cli", "agent", "enroll", "-c", str(cfg)], cwd=ROOT, env=env,
                       check=True, capture_output=True)
        proc = subprocess.Popen([sys.executable, "-m", "fleet.cli", "agent", "run", "-c", str(cfg)], cwd=ROOT,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if any(h.counters.get("frames_seen", 0) > 50 for h in hub.heartbeats()):
                break
            time.sleep(0.1)
        else:
            proc.kill()
            pytest.fail(f"agent never reported frames: {proc.communicate()}")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped_by"] == "signal" and summary["model_version"] == "v1"
    assert summary["frames"] >= 50
    assert "got SIGTERM" in err
    last = hub.heartbeats()[-1]
    assert last.counters["frames_seen"] == summary["frames"]  # the final heartbeat went out on the way down
    assert last.human_compared == summary["frames"] and last.model_version == "v1"
    assert [r.outcome for r in hub.ota_reports()] == ["installed"]
    Spool(tmp_path / "data" / "spool.db", max_bytes=1 << 20).check()


def test_enroll_force_re_enrolls_with_the_devices_own_token(tmp_path: Path, hub: InProcHub) -> None:
    """The hub binds an id to its first enrollment: --force sends the stored token, not just the fleet secret."""
    runner = CliRunner()
    with hub.serve() as url:
        cfg = write_config(tmp_path, url)
        assert runner.invoke(app, ["enroll", "--config", str(cfg)]).exit_code == 0
        (tmp_path / "data" / "enrollment.json").rename(tmp_path / "lost.json")  # credentials lost
        r = runner.invoke(app, ["enroll", "--config", str(cfg)])
        assert r.exit_code == 2 and "HTTP 409" in r.output and "already enrolled" in r.output
        (tmp_path / "lost.json").rename(tmp_path / "data" / "enrollment.json")
        r = runner.invoke(app, ["enroll", "--config", str(cfg), "--force"])
        assert r.exit_code == 0, r.output
        assert "enrolled dev-1" in r.output
