"""The demo's real processes: the hub server, edge agents and trainer runs, each its own OS process."""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from fleet.errors import FlywheelError, error_for_response
from fleet.protocol import Message, TokenCreate, TokenIssued
from fleet.signing import KeyPair

M = TypeVar("M", bound=Message)

log = logging.getLogger(__name__)


class ProcessFailed(FlywheelError, RuntimeError):
    """A child process exited non-zero; the message carries the tail of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    """Whether a server could listen on ``port`` now. SO_REUSEADDR, as uvicorn sets it: the connections a stopped
    server leaves in TIME_WAIT do not keep its port from it."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def flywheel_cmd(*args: str) -> list[str]:
    """``python -m fleet.cli ARGS``: the same ``flywheel`` command, with this interpreter."""
    return [sys.executable, "-m", "fleet.cli", *args]


def tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class HubProcess:
    """A running ``flywheel hub serve`` on a loopback port, with strong secrets."""

    url: str
    admin_token: str
    fleet_secret: str
    webhook_secret: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # HUB_SECRETS by name, to start it again as it was

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def token(self, scope: str, name: str | None = None) -> str:
        """A new token of ``scope`` on this hub."""
        body = TokenCreate(scope=scope, name=name or f"{scope}-{secrets.token_hex(4)}")
        return self.call("POST", "/v1/tokens", TokenIssued, body=body).token

    def call(self, method: str, path: str, answer: type[M], *, body: Message | None = None,
             timeout: float = 30.0) -> M:
        """One admin call: ``body`` sent as JSON, the answer parsed as ``answer``; a refusal is its fleet.errors
        fault (fleet.errors.error_for_response)."""
        headers = dict(self.admin_headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        r = httpx.request(method, self.url + path, headers=headers, timeout=timeout,
                          content=None if body is None else body.to_json())
        err = error_for_response(r, f"{method} {path}")
        if err is not None:
            raise err
        return answer.from_json(r.content)

    def stop(self) -> None:
        stop_process(self.process)


HUB_SECRETS = ("admin", "fleet", "url", "webhook")


def start_hub(data_dir: Path, keypair: KeyPair, *, database_url: str | None = None, workers: int = 1,
              extra_env: dict[str, str] | None = None, timeout: float = 90.0, log_level: str = "warning",
              port: int | None = None, keys: dict[str, str] | None = None) -> HubProcess:
    """Run the hub as a subprocess and wait until ``/healthz`` answers. ``port`` and ``keys`` (the secrets named
    in HUB_SECRETS) bring a hub back as it was, for whatever already holds its URL and secrets (agents' configs,
    Label Studio's tasks and webhook); by default a free port and fresh strong secrets."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if port is None:
        port = free_port()
    elif not port_free(port):
        raise ProcessFailed(f"port {port} on 127.0.0.1 is taken; this hub needs it back (its agents and Label "
                            f"Studio tasks name it): stop whatever holds it and try again")
    if keys is None:
        keys = {name: secrets.token_urlsafe(24) for name in HUB_SECRETS}
    elif missing := [name for name in HUB_SECRETS if not keys.get(name)]:
        raise ValueError(f"hub secrets missing: {missing}; expected all of {list(HUB_SECRETS)}")
    env = {
        **os.environ,
        "FLYWHEEL_HUB_ADMIN_TOKEN": keys["admin"],
        "FLYWHEEL_HUB_FLEET_SECRET": keys["fleet"],
        "FLYWHEEL_HUB_URL_SECRET": keys["url"],
        "FLYWHEEL_HUB_WEBHOOK_SECRET": keys["webhook"],
        "FLYWHEEL_HUB_SIGNING_PUBLIC_KEY": keypair.public_b64,
        "FLYWHEEL_HUB_PUBLIC_URL": f"http://127.0.0.1:{port}",
        **(extra_env or {}),
    }
    env.pop("FLYWHEEL_HUB_DEV", None)
    cmd = flywheel_cmd("hub", "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir),
                       "--workers", str(workers), "--log-level", log_level)
    if database_url:
        cmd += ["--database-url", database_url]
    log_path = data_dir / "hub.log"
    with log_path.open("ab") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    hub = HubProcess(f"http://127.0.0.1:{port}", keys["admin"], keys["fleet"], keys["webhook"], data_dir, proc,
                     log_path, env, dict(keys))
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise ProcessFailed(f"the hub exited with code {proc.returncode}:\n{tail(log_path)}")
            try:
                if httpx.get(hub.url + "/healthz", timeout=1.0).status_code == 200:
                    return hub
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ProcessFailed(f"the hub did not answer /healthz within {timeout:.0f}s:\n{tail(log_path)}")
            time.sleep(0.2)
    except BaseException:  # a timeout, or Ctrl-C while it starts: no hub is left behind
        stop_process(proc)
        raise


def stop_process(proc: subprocess.Popen[Any], *, grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        proc.wait()


class LoggedRun:
    """``cmd`` started in its own session (:func:`start_logged`: a hard kill of the caller leaves it running, so a
    resume must be able to find and stop it), its command line and output appended to ``log_path``; :meth:`wait`
    for it, or :meth:`stop` it. ``timeout`` counts from the start; ``started`` hears the pid at once (the run is
    stopped if it raises)."""

    def __init__(self, cmd: list[str], log_path: Path, *, env: dict[str, str] | None = None,
                 timeout: float = 900.0, ok_codes: tuple[int, ...] = (0,),
                 started: Callable[[int], None] | None = None) -> None:
        self.cmd, self.log_path, self.timeout, self.ok_codes = cmd, log_path, timeout, ok_codes
        self.deadline = time.monotonic() + timeout
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as fh:
            fh.write(("$ " + " ".join(cmd) + "\n").encode())
        self.proc = start_logged(cmd, log_path, env=env)
        if started is not None:
            try:
                started(self.proc.pid)
            except BaseException:
                self.stop()
                raise

    def wait(self) -> int:
        """Its exit code once it ends; ProcessFailed (with the log's tail) unless that is one of ``ok_codes``, or
        when it runs past its timeout. It is stopped when the wait ends otherwise (the timeout, Ctrl-C, TERM)."""
        try:
            code = self.proc.wait(max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.stop()
            raise ProcessFailed(f"{self.cmd[3:5]} ran past {self.timeout:.0f}s:\n{tail(self.log_path)}") from None
        except BaseException:
            self.stop()
            raise
        if code not in self.ok_codes:
            raise ProcessFailed(f"{' '.join(self.cmd[3:5])} exited with code {code}:\n{tail(self.log_path)}")
        return code

    def stop(self) -> None:
        stop_process(self.proc)


def run_logged(cmd: list[str], log_path: Path, *, env: dict[str, str] | None = None,
               timeout: float = 900.0, ok_codes: tuple[int, ...] = (0,),
               started: Callable[[int], None] | None = None) -> int:
    """Run ``cmd`` to completion with its output in ``log_path`` (:class:`LoggedRun`); raise ProcessFailed unless
    it exits ok. ``started`` hears the process's pid as soon as it runs."""
    return LoggedRun(cmd, log_path, env=env, timeout=timeout, ok_codes=ok_codes, started=started).wait()


def run_json(cmd: list[str], log_path: Path, *, env: dict[str, str] | None = None, timeout: float = 300.0,
             ok_codes: tuple[int, ...] = (0,)) -> Any:
    """Run ``cmd`` to completion, its stderr in ``log_path``; parse the last line it printed as JSON."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as fh:
        fh.write(("$ " + " ".join(cmd) + "\n").encode())
        fh.flush()
        try:
            done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=fh, timeout=timeout,
                                  start_new_session=True)
        except subprocess.TimeoutExpired:
            raise ProcessFailed(f"{' '.join(cmd[3:5])} ran past {timeout:.0f}s:\n{tail(log_path)}") from None
    out = done.stdout.decode(errors="replace")
    with log_path.open("a") as fh:
        fh.write(out)
    if done.returncode not in ok_codes:
        raise ProcessFailed(f"{' '.join(cmd[3:5])} exited with code {done.returncode}:\n{tail(log_path)}")
    lines = [line for line in out.splitlines() if line.strip()]
    for text in (out, lines[-1] if lines else ""):  # one JSON document, or JSON lines (the last one counts)
        try:
            return json.loads(text) if text.strip() else None
        except ValueError:
            continue
    raise ProcessFailed(f"{' '.join(cmd[3:5])} printed no JSON; its last line: {lines[-1][:300]!r}")


def start_logged(cmd: list[str], log_path: Path, *, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fh = log_path.open("ab")
    try:
        return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        fh.close()
