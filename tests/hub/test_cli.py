"""`flywheel hub token`, `flywheel models`, `flywheel campaigns` and `flywheel devices` against real hubs."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from fleet.hub.admin_cli import campaigns_app, devices_app, models_app
from fleet.hub.cli import app
from tests.support.hub import RunningHub, start_hub
from tests.support.models import make_model_files

runner = CliRunner()


def test_token_create_writes_a_working_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_HUB_DEV", "1")
    r = runner.invoke(app, ["token", "create", "--scope", "trainer", "--name", "ci", "--data-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    token = r.stdout.strip()  # a note on stderr says a new hub database was set up
    assert token.startswith("fwt_")
    again = runner.invoke(app, ["token", "create", "--scope", "trainer", "--name", "ci", "--data-dir", str(tmp_path)])
    assert again.exit_code == 1
    bad = runner.invoke(app, ["token", "create", "--scope", "device", "--name", "x", "--data-dir", str(tmp_path)])
    assert bad.exit_code == 2
    listing = runner.invoke(app, ["token", "list", "--data-dir", str(tmp_path)])
    assert "ci\ttrainer\tactive" in listing.output
    assert runner.invoke(app, ["token", "revoke", "ci", "--data-dir", str(tmp_path)]).exit_code == 0
    assert "ci\ttrainer\trevoked" in runner.invoke(app, ["token", "list", "--data-dir", str(tmp_path)]).output


@pytest.mark.parametrize("args", [["token", "list"], ["token", "revoke", "ci"], ["sweep-blobs"], ["rescore"]])
def test_a_command_on_an_existing_hub_refuses_a_database_no_hub_set_up(
        args: list[str], backend: str, tmp_path: Path, sqlite_template: Path, pg_template: str | None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong --data-dir or a forgotten --database-url: the command names the database and what it expected, and
    makes nothing there (a SQLite file, tables)."""
    import sqlalchemy as sa

    from fleet.hub.db import current_revision, make_engine
    from tests.hub.conftest import fresh_database

    monkeypatch.setenv("FLYWHEEL_HUB_DEV", "1")
    url, cleanup = fresh_database(backend, tmp_path, sqlite_template=sqlite_template, pg_template=pg_template,
                                  migrated=False)
    # the command exports its options for its workers: set here, they are put back after the test
    monkeypatch.setenv("FLYWHEEL_HUB_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FLYWHEEL_HUB_DATABASE_URL", url)
    try:
        r = runner.invoke(app, [*args, "--data-dir", str(tmp_path / "data"), "--database-url", url])
        shown = sa.make_url(url).render_as_string(hide_password=True)
        assert r.exit_code == 2 and f"error: no hub database at {shown}: " in r.output, r.output
        assert "`flywheel hub serve` (or `flywheel hub migrate`) has set up" in r.output
        if backend == "sqlite":
            assert not Path(sa.make_url(url).database or "").exists() and not (tmp_path / "data").exists()
        else:
            engine = make_engine(url, pool_size=1)
            assert current_revision(engine) is None and not sa.inspect(engine).get_table_names()
            engine.dispose()
    finally:
        cleanup()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> RunningHub:
    with start_hub(tmp_path_factory.mktemp("cli-hub")) as hub:
        yield hub  # type: ignore[misc]


def test_models_list_promote_rollback(live: RunningHub, tmp_path: Path) -> None:
    trainer = {"Authorization": f"Bearer {live.token('trainer')}"}
    for v, seed in (("m1", 0), ("m2", 1)):
        files = make_model_files(tmp_path, v, private_key=live.private_key(), seed=seed)
        r = httpx.post(live.url + "/v1/models", headers=trainer, data={"manifest": files.signed.to_json()},
                       files={"onnx": ("m.onnx", files.onnx_path.read_bytes())})
        assert r.status_code == 201, r.text
    opts = ["--hub", live.url, "--token", live.admin_token]
    assert runner.invoke(models_app, ["promote", "m1", *opts]).exit_code == 0
    r = runner.invoke(models_app, ["promote", "m2", *opts])  # over an active model: through a rollout
    assert r.exit_code == 0 and "rolling out to the whole fleet" in r.output, r.output
    r = runner.invoke(models_app, ["list", "--json", *opts])
    assert {m["version"]: m["status"] for m in json.loads(r.output)} == {"m1": "active", "m2": "canary"}
    r = runner.invoke(models_app, ["promote", "m2", "--override", "--reason", "ship it", *opts])
    assert r.exit_code == 0 and "m2 is active by admin override" in r.output, r.output
    r = runner.invoke(models_app, ["list", "--json", *opts])
    assert {m["version"]: m["status"] for m in json.loads(r.output)} == {"m1": "retired", "m2": "active"}
    r = runner.invoke(models_app, ["rollback", *opts])
    assert r.exit_code == 0 and "active: m1" in r.output
    r = runner.invoke(models_app, ["promote", "nope", *opts])
    assert r.exit_code == 1 and "404" in r.output
    assert runner.invoke(models_app, ["list", *opts]).exit_code == 0
    r = runner.invoke(models_app, ["list", "--hub", live.url, "--token", "wrong"])
    assert r.exit_code == 1 and "401" in r.output


def test_campaigns_apply_list_delete(live: RunningHub, tmp_path: Path) -> None:
    spec = {"format": "flywheel.trigger/1", "id": "night-fog", "version": 1,
            "rule": {"trigger": "entropy", "target_rate": 0.05}}
    f = tmp_path / "c.json"
    f.write_text(json.dumps(spec))
    opts = ["--hub", live.url, "--token", live.admin_token]
    r = runner.invoke(campaigns_app, ["apply", str(f), "--group", "night", *opts])
    assert r.exit_code == 0 and "applied: night-fog v1" in r.output, r.output
    r = runner.invoke(campaigns_app, ["apply", str(f), "--group", "night", *opts])
    assert "unchanged" in r.output
    assert "night-fog\tv1\tnight" in runner.invoke(campaigns_app, ["list", *opts]).output
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**spec, "rule": {"trigger": "vibes"}}))
    r = runner.invoke(campaigns_app, ["apply", str(bad), *opts])
    assert r.exit_code == 1 and "vibes" in r.output
    assert runner.invoke(campaigns_app, ["delete", "night-fog", *opts]).exit_code == 0
    r = runner.invoke(campaigns_app, ["list", *opts])
    assert r.exit_code == 0 and r.stdout == "" and "no live campaign" in r.stderr, (r.stdout, r.stderr)


@pytest.mark.parametrize("args, said", [(["models", "groups"], "no device group yet"),
                                        (["models", "shadows"], "no shadow trial yet"),
                                        (["campaigns", "list"], "no live campaign"),
                                        (["devices", "list"], "no device has enrolled yet"),
                                        (["devices", "list", "-q", "x"], "no enrolled device's id or group holds 'x'")])
def test_an_empty_listing_says_so_on_stderr(tmp_path: Path, args: list[str], said: str) -> None:
    """A person sees why nothing was listed; a script reads an empty stdout."""
    from fleet.cli import app as root

    with start_hub(tmp_path / "hub") as hub:
        r = runner.invoke(root, [*args, "--hub", hub.url, "--token", hub.admin_token])
    assert r.exit_code == 0 and r.stdout == "" and said in r.stderr, (r.stdout, r.stderr)


def test_campaigns_refusals_shows_what_devices_said(live: RunningHub, tmp_path: Path) -> None:
    """A device's refusal, read by an operator: version, device, times, when and the agent's reason, with its
    control characters (a device's words) blanked out."""
    from fleet.protocol import CampaignRefusal, Enrollment, EnrollRequest

    spec = {"format": "flywheel.trigger/1", "id": "dusk", "version": 1, "rule": {"trigger": "entropy", "above": 0.5}}
    f = tmp_path / "dusk.json"
    f.write_text(json.dumps(spec))
    opts = ["--hub", live.url, "--token", live.admin_token]
    assert runner.invoke(campaigns_app, ["apply", str(f), *opts]).exit_code == 0
    assert "no device has refused a version of dusk" in runner.invoke(campaigns_app, ["refusals", "dusk", *opts]).output
    r = httpx.post(f"{live.url}/v1/enroll", content=EnrollRequest("cam-7", fleet_secret=live.fleet_secret).to_json(),
                   headers={"Content-Type": "application/json"})
    token = Enrollment.from_json(r.content).token
    refusal = CampaignRefusal(device_id="cam-7", campaign_id="dusk", version=1, refused_at=1_780_000_000.0,
                              reason="unknown trigger 'entropy'\x1b[2J")
    r = httpx.post(f"{live.url}/v1/campaign-refusals", content=refusal.to_json(),
                   headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    assert r.status_code == 204, r.text
    out = runner.invoke(campaigns_app, ["refusals", "dusk", *opts]).output
    assert "v1\tcam-7\t1\t2026-05-28 20:26:40\tunknown trigger 'entropy' [2J" in out, out
    assert "\x1b" not in out
    as_json = json.loads(runner.invoke(campaigns_app, ["refusals", "dusk", "--json", *opts]).output)
    assert as_json["refusals"][0]["reason"] == refusal.reason
    r = runner.invoke(campaigns_app, ["refusals", "nope", *opts])
    assert r.exit_code == 1 and "404" in r.output


def test_devices_list_finds_and_revoke_from_the_command_line(live: RunningHub, monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator lists the fleet (read a page at a time: two devices a page here), finds devices by id or group,
    and revokes a lost one, whose token then stops working."""
    import fleet.protocol
    from fleet.protocol import Enrollment, EnrollRequest, Heartbeat

    tokens = {}
    for i, group in enumerate(("dock", "dock", "yard", "dock", "yard")):
        r = httpx.post(f"{live.url}/v1/enroll", headers={"Content-Type": "application/json"},
                       content=EnrollRequest(f"ops-{i}", fleet_secret=live.fleet_secret, group=group).to_json())
        assert r.status_code == 200, r.text
        tokens[f"ops-{i}"] = {"Authorization": f"Bearer {Enrollment.from_json(r.content).token}"}
    hb = Heartbeat(device_id="ops-1", sent_at=1_780_000_000.0, boot_id="b1", model_version=None,
                   counters={"frames_seen": 5}, spool_bytes=3072, spool_items=4)
    r = httpx.post(f"{live.url}/v1/heartbeats", content=hb.to_json(),
                   headers={"Content-Type": "application/json", **tokens["ops-1"]})
    assert r.status_code == 204, r.text
    opts = ["--hub", live.url, "--token", live.admin_token]
    monkeypatch.setattr(fleet.protocol, "MAX_DEVICES_PAGE", 2)  # the CLI reads 2 a page: 3 pages for 5 devices

    r = runner.invoke(devices_app, ["list", "--search", "OPS-", *opts])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == "device\tgroup\tmodel\tlast seen (UTC)\tspool items\tspool KiB\trevoked (UTC)"
    assert [line.split("\t")[0] for line in lines[1:]] == [f"ops-{i}" for i in range(5)]
    row = lines[2].split("\t")
    assert row[:2] == ["ops-1", "dock"] and row[4:] == ["4", "3.0", "-"] and row[3] != "never", row
    assert lines[1].split("\t")[3] == "never"
    yard = json.loads(runner.invoke(devices_app, ["list", "-q", "yard", "--json", *opts]).stdout)
    assert [d["device_id"] for d in yard] == ["ops-2", "ops-4"] and yard[0]["group"] == "yard"

    r = runner.invoke(devices_app, ["revoke", "ops-4", *opts])
    assert r.exit_code == 0 and "revoked ops-4: it cannot enroll again; 1 token(s) it held stopped working" in r.output
    assert httpx.get(f"{live.url}/v1/assignment", headers=tokens["ops-4"]).status_code == 401
    revoked = runner.invoke(devices_app, ["list", "-q", "ops-4", *opts]).stdout.splitlines()[1].split("\t")
    assert revoked[0] == "ops-4" and revoked[-1] != "-"
    r = runner.invoke(devices_app, ["revoke", "ops-99", *opts])
    assert r.exit_code == 1 and "404" in r.output and "unknown device 'ops-99'" in r.output
    r = runner.invoke(devices_app, ["list", "-q", "x" * 65, *opts])
    assert r.exit_code == 1 and "the search may be at most 64 characters; received 65" in r.output


def test_root_cli_exposes_the_hub_commands() -> None:
    from fleet.cli import app as root

    for cmd in (["hub", "--help"], ["models", "--help"], ["campaigns", "--help"], ["devices", "--help"]):
        r = runner.invoke(root, cmd)
        assert r.exit_code == 0, r.output


def test_serve_dev_prints_a_loud_warning_and_still_serves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: started.append((a, k)))
    for name in ("DEV", "DATA_DIR", "MIGRATE_ON_START"):  # serve exports these for its workers: restore them
        monkeypatch.setenv(f"FLYWHEEL_HUB_{name}", "0" if name == "DEV" else "")
    monkeypatch.delenv("FLYWHEEL_HUB_DATA_DIR")
    monkeypatch.delenv("FLYWHEEL_HUB_MIGRATE_ON_START")
    r = CliRunner().invoke(app, ["serve", "--dev", "--data-dir", str(tmp_path / "hub")])
    assert r.exit_code == 0, r.output
    assert "WARNING: DEV MODE" in r.output and "dev-admin-token" in r.output and "Never expose it" in r.output
    assert started and started[0][0] == ("fleet.hub.app:create_app_from_env",)
    assert (tmp_path / "hub").stat().st_mode & 0o777 == 0o700
    assert "note:" not in r.stderr, r.stderr
    two = CliRunner().invoke(app, ["serve", "--dev", "--workers", "2", "--data-dir", str(tmp_path / "hub")])
    assert two.exit_code == 0 and started[-1][1]["workers"] == 2, two.output
    assert "note: the 2 workers share one SQLite file (sqlite:///" in two.stderr, two.stderr
    for host in ("0.0.0.0", "192.168.1.5", "::", "cam-hub.local"):  # the dev secrets stay on this machine
        wide = CliRunner().invoke(app, ["serve", "--dev", "--host", host, "--data-dir", str(tmp_path / "wide")])
        assert wide.exit_code == 2 and f"received --host {host!r}" in wide.stderr, wide.output
    assert len(started) == 2 and not (tmp_path / "wide").exists()
    ipv6 = CliRunner().invoke(app, ["serve", "--dev", "--host", "::1", "--data-dir", str(tmp_path / "hub")])
    assert ipv6.exit_code == 0 and started[-1][1]["host"] == "::1", ipv6.output
    monkeypatch.setenv("FLYWHEEL_HUB_DEV", "0")
    quiet = CliRunner().invoke(app, ["serve", "--data-dir", str(tmp_path / "prod")])
    assert quiet.exit_code == 2 and "DEV MODE" not in quiet.output  # no dev mode: refuses the default secrets


def test_a_dev_hub_logs_the_warning_when_it_starts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fleet.hub.app import create_app
    from fleet.hub.settings import HubSettings

    with caplog.at_level("WARNING", logger="fleet.hub.app"):
        create_app(HubSettings(dev=True, data_dir=tmp_path))
    assert any("DEV MODE" in r.getMessage() for r in caplog.records)


def test_keys_rotate_announces_a_new_key_to_a_hub(live: RunningHub, tmp_path: Path) -> None:
    from fleet.keys_cli import app as keys_app
    from fleet.protocol import KeyRotation, KeyRotationList
    from fleet.signing import KeyRing, write_keypair

    old_dir = tmp_path / "old"
    write_keypair(live.keypair, old_dir)
    assert runner.invoke(keys_app, ["generate", "--out", str(tmp_path / "new")]).exit_code == 0
    args = ["rotate", "--old-key", str(old_dir / "signing.key"), "--new-pub", str(tmp_path / "new" / "signing.pub"),
            "--overlap-days", "2"]
    printed = runner.invoke(keys_app, args)  # no --hub: the announcement, to post by other means
    assert printed.exit_code == 0, printed.output
    rotation = KeyRotation.from_json(printed.stdout)
    assert KeyRing(live.keypair.public_b64).accept(rotation)
    assert 2 * 86400 - 60 < rotation.old_key_until - rotation.issued_at <= 2 * 86400
    r = runner.invoke(keys_app, [*args, "--hub", live.url, "--token", live.admin_token])
    assert r.exit_code == 0 and "count until" in r.output, r.output
    got = KeyRotationList.from_json(httpx.get(live.url + "/v1/keys/rotations",
                                              headers={"Authorization": f"Bearer {live.token('trainer')}"}).content)
    assert [x.new_public_key for x in got.rotations] == [rotation.new_public_key]
    same = runner.invoke(keys_app, ["rotate", "--old-key", str(old_dir / "signing.key"), "--new-pub",
                                    str(old_dir / "signing.pub")])
    assert same.exit_code == 2 and "new key is the old key" in same.output
    wrong = runner.invoke(keys_app, [*args, "--hub", live.url, "--token", "wrong"])
    assert wrong.exit_code == 1 and "401" in wrong.output


def test_models_shadow_trials_from_the_command_line(live: RunningHub, tmp_path: Path) -> None:
    trainer = {"Authorization": f"Bearer {live.token('trainer')}"}
    files = make_model_files(tmp_path, "m-shadow", private_key=live.private_key(), seed=7)
    r = httpx.post(live.url + "/v1/models", headers=trainer, data={"manifest": files.signed.to_json()},
                   files={"onnx": ("m.onnx", files.onnx_path.read_bytes())})
    assert r.status_code == 201, r.text
    if not any(m["status"] == "active" for m in httpx.get(live.url + "/v1/models", headers=trainer).json()["models"]):
        files0 = make_model_files(tmp_path, "m-base", private_key=live.private_key(), seed=8)
        httpx.post(live.url + "/v1/models", headers=trainer, data={"manifest": files0.signed.to_json()},
                   files={"onnx": ("m.onnx", files0.onnx_path.read_bytes())}).raise_for_status()
        assert runner.invoke(models_app, ["promote", "m-base", "--hub", live.url, "--token",
                                          live.admin_token]).exit_code == 0
    opts = ["--hub", live.url, "--token", live.admin_token]
    r = runner.invoke(models_app, ["shadow", "m-shadow", "--group", "cam-north", "--frames", "50", *opts])
    assert r.exit_code == 0 and "m-shadow beside" in r.output and "running" in r.output, r.output
    trial_id = r.output.split()[0]
    listed = runner.invoke(models_app, ["shadows", "--json", *opts])
    assert listed.exit_code == 0 and json.loads(listed.output)[0]["trial_id"] == trial_id
    early = runner.invoke(models_app, ["shadow-promote", trial_id, *opts])
    assert early.exit_code == 1 and "no field comparisons" in early.output
    bad = runner.invoke(models_app, ["shadow-promote", trial_id, "--stages", "half", *opts])
    assert bad.exit_code == 2 and "--stages" in bad.output


def test_models_rollout_to_a_group_groups_and_unpin_from_the_command_line(live: RunningHub, tmp_path: Path) -> None:
    trainer = {"Authorization": f"Bearer {live.token('trainer')}"}
    files = make_model_files(tmp_path, "m-east", private_key=live.private_key(), seed=11)
    r = httpx.post(live.url + "/v1/models", headers=trainer, data={"manifest": files.signed.to_json()},
                   files={"onnx": ("m.onnx", files.onnx_path.read_bytes())})
    assert r.status_code == 201, r.text
    opts = ["--hub", live.url, "--token", live.admin_token]
    bad = runner.invoke(models_app, ["rollout", "m-east", "--group", "cam-east", "--stages", "all", *opts])
    assert bad.exit_code == 2 and "--stages" in bad.output
    r = runner.invoke(models_app, ["rollout", "m-east", "--group", "cam-east", "--stages", "1.0", *opts])
    assert r.exit_code == 0 and "m-east over" in r.output and "on group 'cam-east'" in r.output, r.output
    rollout_id = r.output.split(":")[0]
    listed = runner.invoke(models_app, ["groups", "--json", *opts])
    east = {g["group"]: g for g in json.loads(listed.output)}["cam-east"]
    assert (east["pinned"], east["rollout_id"], east["devices"]) == (False, rollout_id, 0)
    done = httpx.post(f"{live.url}/v1/rollouts/{rollout_id}/advance", headers=trainer)
    assert done.status_code == 200 and done.json()["state"] == "completed", done.text
    table = runner.invoke(models_app, ["groups", *opts])
    assert table.exit_code == 0 and "cam-east\t0 devices\tm-east, its own (before:" in table.output, table.output
    r = runner.invoke(models_app, ["unpin", "cam-east", *opts])
    assert r.exit_code == 0 and "cam-east runs the fleet's model" in r.output, r.output
    again = runner.invoke(models_app, ["unpin", "cam-east", *opts])
    assert again.exit_code == 1 and "no model of its own" in again.output


def test_an_admin_command_prints_its_answer_not_a_log_line_per_request(live: RunningHub) -> None:
    """`flywheel models list` on an operator's terminal: the answer, without httpx's INFO line for each request,
    which --verbose brings back."""
    import subprocess
    import sys

    base = [sys.executable, "-m", "fleet.cli"]
    opts = ["models", "list", "--hub", live.url, "--token", live.token("admin")]
    quiet = subprocess.run([*base, *opts], capture_output=True, text=True, timeout=60)
    assert quiet.returncode == 0, quiet.stderr
    assert "HTTP Request" not in quiet.stderr, quiet.stderr
    loud = subprocess.run([*base, "--verbose", *opts], capture_output=True, text=True, timeout=60)
    assert loud.returncode == 0 and f"HTTP Request: GET {live.url}/v1/models" in loud.stderr, loud.stderr


def test_a_hub_command_says_which_migrations_ran_but_not_the_database_kind_each_time(tmp_path: Path) -> None:
    """alembic notes the database's kind ("Context impl SQLiteImpl") each time a hub command opens it; that is
    --verbose's detail. The migrations it runs are news, and are said."""
    import subprocess
    import sys

    base = [sys.executable, "-m", "fleet.cli"]
    opts = ["hub", "migrate", "--data-dir", str(tmp_path / "hub")]
    first = subprocess.run([*base, *opts], capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and "Running upgrade  -> 0001" in first.stderr, first.stderr
    assert "Context impl" not in first.stderr and "Will assume" not in first.stderr, first.stderr
    again = subprocess.run([*base, *opts], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "alembic" not in again.stderr, again.stderr
    loud = subprocess.run([*base, "--verbose", *opts], capture_output=True, text=True, timeout=120)
    assert loud.returncode == 0 and "Context impl SQLiteImpl" in loud.stderr, loud.stderr
