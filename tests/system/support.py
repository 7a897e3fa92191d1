"""Helpers for the whole-system tests: a hub that can be killed and restarted on its port, real agent
processes over npz shards, model publishing, a fresh PostgreSQL database, and the figures the suite reports.

Everything runs on 127.0.0.1; every wait has a deadline; every process started here is killed by the
context manager that started it.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from fleet.protocol import (
    CASE_STATES,
    Assignment,
    Case,
    DeviceList,
    DevicePublic,
    ModelList,
    PoolPage,
    RolloutPublic,
)
from tests.support.hub import REPO, RunningHub, start_hub, stop
from tests.support.models import ModelFiles
from tests.support.services import missing_service

PG_URL = os.environ.get("FLYWHEEL_TEST_PG_URL")
PG_ADMIN_URL = os.environ.get("FLYWHEEL_TEST_PG_ADMIN_URL")


# ---------------------------------------------------------------------------------------------
# figures: what the suite injected and survived, for benchmarks/RESULTS.md
# ---------------------------------------------------------------------------------------------


def record(test: str, **figures: Any) -> None:
    """Append one test's figures as a JSON line to $FLYWHEEL_SYSTEM_FIGURES (if set) and print them."""
    line = json.dumps({"test": test, **figures}, sort_keys=True)
    print(f"[system figures] {line}")
    path = os.environ.get("FLYWHEEL_SYSTEM_FIGURES")
    if path:
        with open(path, "a") as fh:
            fh.write(line + "\n")


def wait_for(what: str, check: Callable[[], Any], *, timeout: float, every: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last value {last!r:.500}")


# ---------------------------------------------------------------------------------------------
# the hub, restartable on the same port
# ---------------------------------------------------------------------------------------------


@contextmanager
def restartable_hub(data_dir: Path, **kw: Any) -> Iterator[RunningHub]:
    """:func:`tests.support.hub.start_hub`, plus whatever :func:`respawn` started, all stopped at the end."""
    hub: RunningHub | None = None
    try:
        with start_hub(data_dir, **kw) as hub:
            yield hub
    finally:
        if hub is not None:
            with suppress(ProcessLookupError, OSError):
                os.killpg(hub.process.pid, signal.SIGCONT)  # a test may leave it stopped
            stop(hub.process)


def kill9(hub: RunningHub) -> None:
    """SIGKILL the hub's whole process group (uvicorn and its workers): a power cut of the server."""
    with suppress(ProcessLookupError):
        os.killpg(hub.process.pid, signal.SIGKILL)
    hub.process.wait(30)


def respawn(hub: RunningHub, *, timeout: float = 60.0) -> None:
    """Start the same hub command again (same port, data dir, database and secrets) and wait for /healthz."""
    assert hub.process.poll() is not None, "respawn a hub only after it is dead"
    cmd = list(hub.process.args)  # type: ignore[arg-type]
    with hub.log_path.open("ab") as log:
        hub.process = subprocess.Popen(cmd, cwd=REPO, env=hub.env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)

    def healthy() -> bool:
        if hub.process.poll() is not None:
            raise AssertionError(f"the restarted hub exited with {hub.process.returncode}:\n{hub.log()[-3000:]}")
        try:
            return httpx.get(hub.url + "/healthz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for("the restarted hub's /healthz", healthy, timeout=timeout, every=0.1)


@contextmanager
def fresh_pg_database() -> Iterator[str | None]:
    """A new empty PostgreSQL database (URL) on the server scripts/test.sh started; None without one (the test
    then runs on SQLite), except under the test command, which promised PostgreSQL: then the test fails."""
    if not PG_URL or not PG_ADMIN_URL:
        if os.environ.get("FLYWHEEL_TEST_SERVICES") == "required":
            missing_service("FLYWHEEL_TEST_PG_URL is not set (scripts/test.sh starts PostgreSQL and sets it)")
        yield None
        return
    import psycopg
    import sqlalchemy as sa

    name = f"flywheel_sys_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield sa.make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ---------------------------------------------------------------------------------------------
# hub API shortcuts
# ---------------------------------------------------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def publish(hub: RunningHub, files: ModelFiles, trainer: str, *, promote: bool = False) -> None:
    assert files.signed is not None
    r = httpx.post(hub.url + "/v1/models", headers=bearer(trainer), timeout=30,
                   files={"onnx": ("model.onnx", files.onnx_path.read_bytes(), "application/octet-stream")},
                   data={"manifest": files.signed.to_json()})
    assert r.status_code in (200, 201), r.text
    if promote:
        r = httpx.post(f"{hub.url}/v1/models/{files.manifest.version}/promote", headers=hub.admin_headers, timeout=30,
                       json={"override": True, "reason": "system test: active at once"})
        assert r.status_code == 200, r.text


def assert_each_frame_once(cases: list[Case], expected: dict[str, set[str]]) -> dict[str, list[str]]:
    """Every case id at most once, and per device exactly the ``expected`` frames, each once (the frames the
    hub holds per device are returned)."""
    by_id = collections.Counter(c.case_id for c in cases)
    assert max(by_id.values()) == 1, f"cases stored twice: {[k for k, v in by_id.items() if v > 1][:5]}"
    got: dict[str, list[str]] = collections.defaultdict(list)
    for c in cases:
        got[c.device_id].append(c.tags["frame"])
    for dev, want in expected.items():
        frames = got[dev]
        assert len(frames) == len(set(frames)), f"{dev}: a frame was filed twice"
        assert set(frames) == want, (f"{dev}: missing {sorted(want - set(frames))[:5]}, "
                                     f"extra {sorted(set(frames) - want)[:5]}")
    return got


def model_statuses(client: httpx.Client, token: str) -> dict[str, str]:
    """Every registered model version -> its status (``client``: a client of the hub)."""
    r = client.get("/v1/models", headers=bearer(token))
    r.raise_for_status()
    return {m.version: m.status for m in ModelList.from_json(r.content).models}


def all_cases(hub: RunningHub, token: str) -> list[Case]:
    """Every case the hub holds, in every state (paged through /v1/pool), as the devices sent them."""
    out: list[Case] = []
    with httpx.Client(base_url=hub.url, headers=bearer(token), timeout=30) as c:
        for state in CASE_STATES:
            offset = 0
            while True:
                r = c.get("/v1/pool", params={"state": state, "limit": 1000, "offset": offset})
                r.raise_for_status()
                page = PoolPage.from_json(r.content).cases
                out += [selected.case for selected in page]
                offset += len(page)
                if len(page) < 1000:
                    break
    return out


def rollout_state(hub: RunningHub, rollout_id: str) -> RolloutPublic:
    r = httpx.get(f"{hub.url}/v1/rollouts/{rollout_id}", headers=hub.admin_headers, timeout=30)
    r.raise_for_status()
    return RolloutPublic.from_json(r.content)


def assignment_of(hub: RunningHub, device_id: str) -> Assignment:
    r = httpx.get(hub.url + "/v1/assignment", params={"device_id": device_id}, headers=hub.admin_headers, timeout=30)
    r.raise_for_status()
    return Assignment.from_json(r.content)


def devices(hub: RunningHub) -> dict[str, DevicePublic]:
    r = httpx.get(hub.url + "/v1/devices", headers=hub.admin_headers, timeout=30)
    r.raise_for_status()
    return {d.device_id: d for d in DeviceList.from_json(r.content).devices}


# ---------------------------------------------------------------------------------------------
# real agent processes
# ---------------------------------------------------------------------------------------------


def flagging_spec(spec_id: str = "system", **extra: Any) -> dict[str, Any]:
    """A spec that keeps exactly the frames tagged ``flag=1`` (``random below 1`` always fires on them)."""
    return {"id": spec_id, "version": 1, "filters": {"tags": {"flag": ["1"]}},
            "rule": {"any_of": [{"trigger": "random", "below": 1.0, "seed": 7}]}, **extra}


@dataclass
class AgentDir:
    """One device's folder: agent.toml, its shard, its data dir, logs."""

    root: Path
    device_id: str

    @property
    def config(self) -> Path:
        return self.root / "agent.toml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def out(self) -> Path:
        return self.root / "agent.out"

    @property
    def log(self) -> Path:
        return self.root / "agent.log"

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else "(no log)"

    def summary(self) -> dict[str, Any]:
        """The JSON summary ``flywheel agent run`` prints last on stdout."""
        lines = [ln for ln in self.out.read_text().splitlines() if ln.startswith("{")]
        assert lines, f"{self.device_id}: no summary on stdout; log:\n{self.log_tail()}"
        return dict(json.loads(lines[-1]))


def write_shard(path: Path, n: int, *, seed: int, flag_every: int = 1, human: np.ndarray | None = None,
                extra_tags: dict[str, np.ndarray] | None = None, prefix: str = "f") -> list[str]:
    """Random 8x8 frames with a unique ``frame`` tag and ``flag`` = 1 on every ``flag_every``-th; returns frame ids."""
    rng = np.random.default_rng(seed)
    frames = np.array([f"{prefix}{seed}-{i:05d}" for i in range(n)])
    flag = np.array(["1" if i % flag_every == 0 else "0" for i in range(n)])
    arrays: dict[str, Any] = {"images": rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), "tag_frame": frames,
                              "tag_flag": flag}
    if human is not None:
        arrays["human"] = human.astype(np.int64)
    for k, v in (extra_tags or {}).items():
        arrays[f"tag_{k}"] = v
    np.savez(path, **arrays)
    return [str(f) for f, g in zip(frames, flag, strict=True) if g == "1"]


def make_agent(root: Path, hub: RunningHub, device_id: str, *, spec: dict[str, Any] | None = None,
               shard: str = "shard.npz", loop: bool = False, fps: float = 0.0, spool_max_bytes: int = 64 << 20,
               timeout_s: float = 2.0, backoff_max_s: float = 1.0, drain_timeout_s: float = 60.0,
               heartbeat_s: float = 0.5, poll_s: float = 0.5, batch_size: int = 8, trigger_window: int = 16,
               enroll: bool = True, source: dict[str, Any] | None = None, group: str = "default") -> AgentDir:
    """Write agent.toml (and the default spec) under ``root`` and enroll the device through the CLI. ``source``:
    the ``[source]`` table instead of the npz ``shard`` (say ``{"kind": "video", "path": "clip.mp4"}``)."""
    root.mkdir(parents=True, exist_ok=True)
    spec_line = ""
    if spec is not None:
        (root / "spec.json").write_text(json.dumps(spec))
        spec_line = '[triggers]\ndefault_spec = "spec.json"\n'
    source_table = (f'kind = "npz"\npath = "{shard}"\nloop = {str(loop).lower()}\nfps = {fps}\n' if source is None
                    else "".join(f"{k} = {json.dumps(v)}\n" for k, v in source.items()))
    (root / "agent.toml").write_text(
        f'device_id = "{device_id}"\ndata_dir = "data"\n\n'
        f'[hub]\nurl = "{hub.url}"\nfleet_secret = "{hub.fleet_secret}"\n'
        f'fleet_public_key = "{hub.keypair.public_b64}"\ntimeout_s = {timeout_s}\ngroup = "{group}"\n\n'
        f"[source]\n{source_table}\n"
        f"[runtime]\nthreads = 1\nbatch_size = {batch_size}\ntrigger_window = {trigger_window}\n"
        "trigger_max_delay_s = 0.5\n\n"
        f"[spool]\nmax_bytes = {spool_max_bytes}\n\n"
        f"[uplink]\nbackoff_base_s = 0.05\nbackoff_max_s = {backoff_max_s}\ndrain_timeout_s = {drain_timeout_s}\n\n"
        f"[heartbeat]\ninterval_s = {heartbeat_s}\n\n[ota]\npoll_interval_s = {poll_s}\n\n{spec_line}"
    )
    agent = AgentDir(root, device_id)
    if enroll:
        run = subprocess.run(agent_cmd("enroll", agent.config), cwd=REPO, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
    return agent


def agent_cmd(verb: str, config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fleet.cli", "agent", verb, "--config", str(config), *extra]


@dataclass
class AgentProcs:
    """Agent processes started by :func:`agents_running`; ``wait`` collects exit codes."""

    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def wait(self, timeout: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        codes = {}
        for dev, p in self.procs.items():
            try:
                codes[dev] = p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"agent {dev} still running after {timeout:.0f}s") from None
        return codes

    def terminate(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)


def start_agent(agent: AgentDir, *args: str, module: list[str] | None = None,
                env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    cmd = module or agent_cmd("run", agent.config, *args)
    with agent.out.open("ab") as out, agent.log.open("ab") as err:
        return subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, start_new_session=True,
                                env=env or {**os.environ, "PYTHONPATH": str(REPO)})


@contextmanager
def agents_running(agents: list[AgentDir], *args: str) -> Iterator[AgentProcs]:
    """Run ``flywheel agent run`` for each agent; SIGTERM, then SIGKILL, whatever is left at the end."""
    procs = AgentProcs()
    try:
        for a in agents:
            procs.procs[a.device_id] = start_agent(a, *args)
        yield procs
    finally:
        procs.terminate()
        for p in procs.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


def spool_stats(agent: AgentDir) -> dict[str, Any]:
    """``flywheel agent status``: the device's models and spool counters, read from its disk."""
    run = subprocess.run(agent_cmd("status", agent.config), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    return dict(json.loads(run.stdout))



def digits_snapshot(hub: RunningHub, tmp: Path, prefix: str, n: int) -> tuple[str, str, dict[str, str]]:
    """A digits classifier ``<prefix>-m0`` published and active on ``hub``, ``n`` of scikit-learn's digits sent by
    device ``<prefix>-dev`` as its cases and labeled with their digit, and a snapshot of them. Returns the trainer
    token, the snapshot id and the device's headers."""
    from tests.support.cases import label_post, make_case
    from tests.support.data import digits_arrays, png_bytes
    from tests.support.models import make_model_files

    trainer, labeler = hub.token("trainer"), hub.token("labeler")
    m0 = make_model_files(tmp / "m", f"{prefix}-m0", private_key=hub.private_key(), num_classes=10,
                          class_names=[str(i) for i in range(10)])
    publish(hub, m0, trainer, promote=True)
    x, y = digits_arrays()
    with httpx.Client(base_url=hub.url, timeout=30) as c:
        r = c.post("/v1/enroll", json={"device_id": f"{prefix}-seed", "fleet_secret": hub.fleet_secret})
        device = bearer(r.json()["token"])
        for i in range(n):
            img = png_bytes(x[i])
            case = make_case(case_id=f"{prefix}-case-{i:03d}", device_id=f"{prefix}-seed", model_version=f"{prefix}-m0",
                             probs=[0.1] * 10, image=img, tags={}, triggers=[])
            r = c.post("/v1/cases", headers=device, data={"case": case.to_json()},
                       files={"image": ("f.png", img, "image/png")})
            assert r.status_code in (200, 201), r.text
            r = c.post("/v1/labels", headers=bearer(labeler),
                       json=label_post(case.case_id, int(y[i]), annotation_id=i + 1))
            assert r.status_code in (200, 201), r.text
        snap = c.post("/v1/snapshots", headers=bearer(trainer), json={"name": prefix}).json()["snapshot_id"]
    return trainer, str(snap), device
