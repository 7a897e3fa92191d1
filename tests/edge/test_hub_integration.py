"""The real agent against the real hub process: enroll, assignment, OTA, cases, heartbeats, refusals."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from fleet.edge.agent import Agent
from fleet.edge.cli import app
from fleet.edge.config import load_config
from tests.support.hub import RunningHub, start_hub
from tests.support.models import ModelFiles, make_model_files

pytestmark = pytest.mark.slow

SPEC = {"id": "edge-it", "version": 1, "rule": {"any_of": [
    {"trigger": "entropy", "target_rate": 0.3},
    {"trigger": "human_disagreement", "above": 0.5},
]}}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningHub]:
    with start_hub(tmp_path_factory.mktemp("hub")) as running:
        yield running


def publish(hub: RunningHub, files: ModelFiles, *, promote: bool = True) -> None:
    assert files.signed is not None
    trainer = {"Authorization": f"Bearer {hub.token('trainer')}"}
    r = httpx.post(hub.url + "/v1/models", headers=trainer,
                   files={"onnx": ("model.onnx", files.onnx_path.read_bytes(), "application/octet-stream")},
                   data={"manifest": files.signed.to_json()})
    assert r.status_code in (200, 201), r.text
    if promote:
        r = httpx.post(hub.url + f"/v1/models/{files.manifest.version}/promote", headers=hub.admin_headers,
                       json={"override": True, "reason": "integration test: active at once"})
        assert r.status_code == 200, r.text


def hub_db(hub: RunningHub, sql: str) -> list[Any]:
    with sqlite3.connect(hub.data_dir / "hub.db") as conn:
        return conn.execute(sql).fetchall()


def write_frames(tmp_path: Path, n_frames: int, *, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    np.savez(tmp_path / "frames.npz", images=rng.integers(0, 256, (n_frames, 8, 8), dtype=np.uint8),
             human=np.arange(n_frames) % 3, tag_site=np.array(["north"] * n_frames))


def write_config(tmp_path: Path, hub: RunningHub, n_frames: int, *, device_id: str = "edge-it-1") -> Path:
    write_frames(tmp_path, n_frames)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
device_id = "{device_id}"
data_dir = "data"
[hub]
url = "{hub.url}"
fleet_secret = "{hub.fleet_secret}"
fleet_public_key = "{hub.keypair.public_b64}"
[source]
kind = "npz"
path = "frames.npz"
[heartbeat]
interval_s = 0.2
[ota]
poll_interval_s = 0.2
[uplink]
backoff_base_s = 0.05
backoff_max_s = 0.5
drain_timeout_s = 15
""")
    return cfg


def run_agent(cfg: Path, **kw: Any) -> Any:
    agent = Agent(load_config(cfg))
    try:
        return agent.run(**kw)
    finally:
        agent.close()


def test_agent_against_the_real_hub(tmp_path: Path, hub: RunningHub) -> None:
    key = hub.private_key()
    models = tmp_path / "models"
    v1 = make_model_files(models, "edge-it-v1", private_key=key, seed=1)
    publish(hub, v1)
    r = httpx.post(hub.url + "/v1/campaigns", headers=hub.admin_headers, json=SPEC)
    assert r.status_code in (200, 201), r.text
    cfg = write_config(tmp_path, hub, 60)

    # enroll through the CLI: the token is stored, the hub's key pinned
    result = CliRunner().invoke(app, ["enroll", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    enrollment = json.loads((tmp_path / "data" / "enrollment.json").read_text())
    assert enrollment["fleet_public_key"] == hub.keypair.public_b64

    # another machine with the same config (the fleet secret) cannot take the id over; --force, with the
    # device's own token, re-enrolls the real one
    thief = tmp_path / "thief"
    thief.mkdir()
    (thief / "agent.toml").write_text(cfg.read_text())
    stolen = CliRunner().invoke(app, ["enroll", "--config", str(thief / "agent.toml")])
    assert stolen.exit_code == 2 and "409" in stolen.output and "already enrolled" in stolen.output, stolen.output
    again = CliRunner().invoke(app, ["enroll", "--config", str(cfg), "--force"])
    assert again.exit_code == 0, again.output
    renewed = json.loads((tmp_path / "data" / "enrollment.json").read_text())
    assert renewed["token"] != enrollment["token"]

    # first run: the assignment brings v1 over OTA, the campaign flags frames, cases and heartbeats land
    first = run_agent(cfg)
    assert first.model_version == "edge-it-v1" and first.frames == 60
    assert first.flagged > 0 and first.uploaded == first.flagged and first.spool_items == 0
    pool = httpx.get(hub.url + "/v1/pool", params={"state": "unlabeled", "limit": 1000},
                     headers=hub.admin_headers).json()
    mine = [c for c in pool["cases"] if c["case"]["model_version"] == "edge-it-v1"]
    assert len(mine) == first.flagged
    assert all(c["case"]["tags"].get("site") == "north" for c in mine)
    devices = httpx.get(hub.url + "/v1/devices", headers=hub.admin_headers).json()["devices"]
    me = next(d for d in devices if d["device_id"] == "edge-it-1")
    assert me["model_version"] == "edge-it-v1" and me["last_seen_at"] is not None
    reports = hub_db(hub, "SELECT version, outcome FROM ota_reports WHERE device_id = 'edge-it-1'")
    assert reports == [("edge-it-v1", "installed")]

    # the heartbeats' cumulative counters became per-version field metrics on the hub
    (values,) = hub_db(hub, "SELECT \"values\" FROM heartbeat_states WHERE device_id = 'edge-it-1'")[0]
    counters = json.loads(values)
    assert counters["frames_seen"] == 60 and counters["flagged"] == first.flagged
    assert counters["uploaded"] == first.uploaded and counters["human_compared"] == 60

    # a restart goes on where the source left off: these frames are done, nothing is flagged again
    assert run_agent(cfg).frames == 0
    # a second start on new frames mines at once with the campaign it remembers, and sends only its own
    # new cases
    write_frames(tmp_path, 60, seed=1)
    again = run_agent(cfg)
    assert again.flagged > 0 and again.uploaded == again.flagged
    totals = [httpx.get(hub.url + "/v1/pool", params={"state": state, "limit": 1000},
                        headers=hub.admin_headers).json()["total"] for state in ("unlabeled", "duplicate")]
    assert sum(totals) == first.flagged + again.flagged

    # OTA to v2, keeping v1 as the previous model
    v2 = make_model_files(models, "edge-it-v2", private_key=key, seed=2, parent="edge-it-v1")
    publish(hub, v2)
    write_frames(tmp_path, 60, seed=2)
    second = run_agent(cfg, max_frames=10)
    assert second.model_version == "edge-it-v2"
    state = json.loads((tmp_path / "data" / "models" / "state.json").read_text())
    assert state["active"].startswith("edge-it-v2-") and state["previous"].startswith("edge-it-v1-")

    # a model that passes the hub's checks but returns NaN: refused on the device, the hub told why
    bad = make_model_files(models, "edge-it-v3", private_key=key, seed=3, poison="nan", parent="edge-it-v2")
    publish(hub, bad)
    third = run_agent(cfg, max_frames=10)  # goes on with the frames the second run left
    assert third.model_version == "edge-it-v2"
    reports = hub_db(hub, "SELECT version, outcome, reason FROM ota_reports WHERE device_id = 'edge-it-1' "
                          "ORDER BY id")
    assert [(v, o) for v, o, _ in reports] == [
        ("edge-it-v1", "installed"), ("edge-it-v2", "installed"), ("edge-it-v3", "refused"),
    ]
    assert "NaN" in reports[-1][2]


def test_a_campaign_the_agent_cannot_run_is_reported_to_the_hub(tmp_path: Path, hub: RunningHub,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The real agent is given two campaigns and its trigger package refuses one (a parameter it does not know:
    an agent a release behind the hub's). It runs the other and tells the hub why; an agent restart refuses
    and tells again, and the hub counts it."""
    import trigger
    from fleet.protocol import CampaignRefusals

    real_parse = trigger.parse_spec

    def behind(doc: Any) -> Any:
        if isinstance(doc, dict) and doc.get("id") == "strict":
            raise trigger.SpecError("entropy: unknown parameter 'hysteresis'")
        return real_parse(doc)

    monkeypatch.setattr(trigger, "parse_spec", behind)  # the agent's side only: the hub is another process
    publish(hub, make_model_files(tmp_path / "models", "edge-it-r1", private_key=hub.private_key(), seed=5))
    for spec in (SPEC, {**SPEC, "id": "strict"}):
        r = httpx.post(hub.url + "/v1/campaigns", headers=hub.admin_headers, json=spec)
        assert r.status_code in (200, 201), r.text
    cfg = write_config(tmp_path, hub, 30, device_id="edge-it-2")
    assert CliRunner().invoke(app, ["enroll", "--config", str(cfg)]).exit_code == 0
    run = run_agent(cfg)
    assert run.model_version == "edge-it-r1" and run.flagged > 0  # the campaign it could run mined

    def refusals() -> list[tuple[int, str, int, str]]:
        r = httpx.get(hub.url + "/v1/campaigns/strict/refusals", headers=hub.admin_headers)
        assert r.status_code == 200, r.text
        return [(x.version, x.device_id, x.times, x.reason) for x in CampaignRefusals.from_json(r.content).refusals]

    assert refusals() == [(1, "edge-it-2", 1, "entropy: unknown parameter 'hysteresis'")]
    r = httpx.get(hub.url + "/v1/campaigns/edge-it/refusals", headers=hub.admin_headers)
    assert [x["device_id"] for x in r.json()["refusals"]] == []
    write_frames(tmp_path, 10, seed=3)
    run_agent(cfg)  # a restart: the remembered assignment is refused again, and said again
    assert [(v, d, n) for v, d, n, _ in refusals()] == [(1, "edge-it-2", 2)]
