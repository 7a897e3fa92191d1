"""``flywheel demo --serve``: a demo's hub, and its Label Studio, back from the workspace, to browse after the run.

A demo stops its hub and Label Studio when it ends, so its dashboard (fleet, campaigns, queue, model lineage) and
the annotations in Label Studio could be seen only while it ran. ``--serve`` starts both again from the workspace,
on the ports and with the secrets the demo's state holds (the same login as during the run), says where they are,
and keeps them up until Ctrl-C or a TERM. Nothing is trained, labeled or rolled out.

A workspace whose demo is still running (a process carries its mark, or its hub's port is taken) is refused: its
servers are up already, and a second Label Studio on the same data would share its database.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.sim.procs import HubProcess, ProcessFailed, port_free, start_hub, stop_process
from fleet.sim.resume import STATE_FILE, DemoState, NotResumable, marked_processes, marking_children

Say = Callable[[str], None]
POLL_S = 1.0  # how often the wait looks at whether the servers are still running


@dataclass
class Served:
    """What ``--serve`` started: the hub, and Label Studio where the demo labeled with it."""

    hub: HubProcess
    studio: Any = None  # a fleet.sim.studio.StudioServer, or None

    def exited(self) -> str | None:
        """The name of a server that has stopped on its own, or None while both run."""
        if self.hub.process.poll() is not None:
            return f"the hub (exit code {self.hub.process.returncode}; its log: {self.hub.log_path})"
        proc = None if self.studio is None else self.studio.process
        if proc is not None and proc.poll() is not None:
            return f"Label Studio (exit code {proc.returncode}; its log: {self.studio.log_path})"
        return None


def demo_state(ws: Path) -> DemoState:
    """The demo's state in ``ws``; ValueError (what was found, what was expected) for a folder that holds none."""
    if not (ws / STATE_FILE).is_file():
        why = "does not exist" if not ws.exists() else f"holds no {STATE_FILE}"
        raise ValueError(f"workspace {ws} {why}; expected the --workspace of a flywheel demo (one that got as far as "
                         f"its base model)")
    try:
        return DemoState.load(ws)
    except NotResumable as exc:
        raise ValueError(str(exc)) from None


@contextlib.contextmanager
def serving(ws: Path, say: Say) -> Iterator[Served]:
    """Start the demo's hub (and Label Studio) from ``ws``, say where they are and how to log in, yield them, and
    stop them on the way out."""
    from fleet.signing import read_keypair

    state = demo_state(ws)
    running = marked_processes(ws)
    port = int(state.hub["port"])
    if running or not port_free(port):
        what = ", ".join(sorted(set(running.values()))) or f"a process on the hub's port {port}"
        raise ValueError(f"the demo in {ws} is still running ({what}): its hub is up already at "
                         f"http://127.0.0.1:{port}/ui; --serve is for a demo that has stopped (where a killed run or "
                         f"--serve left these running, `flywheel demo --resume --workspace {ws}` stops them)")
    settings = state.demo_settings()
    with marking_children(ws):  # a later --resume finds and stops these, as it does a run's leftovers
        hub = start_hub(ws / "hub", read_keypair(ws / "keys"), port=port, keys=state.hub["keys"],
                        extra_env=None if settings.rescore else {"FLYWHEEL_HUB_SELECTION_SPACE": "capture"})
        served = Served(hub)
        try:
            say(f"dashboard: {hub.url}/ui")
            say(f"admin token: {hub.admin_token}")
            served.studio = _studio(ws, state.studio, say)
            yield served
        finally:
            if served.studio is not None:
                served.studio.stop()
            stop_process(hub.process)


def _studio(ws: Path, session: dict[str, Any], say: Say) -> Any:
    """The demo's Label Studio started again on its data, or None (with a line that says why) where the demo labeled
    with the oracle or the server cannot be had here."""
    login = (session or {}).get("server")
    if not login:
        say("Label Studio: this demo did not run one (it labeled with the built-in oracle, or with a server of your "
            "own: FLYWHEEL_STUDIO_URL)")
        return None
    from fleet.sim.studio import find_studio_bin, start_studio

    binary = find_studio_bin()
    if binary is None:
        say("Label Studio: no label-studio executable here (the demo installs one into ./.venv-studio; run --serve "
            "from the folder the demo ran in, or set FLYWHEEL_STUDIO_BIN)")
        return None
    say("starting Label Studio on the demo's data (a minute or so)")
    try:
        server = start_studio(ws / "label-studio" / "data", binary=binary, port=login.get("port"),
                              token=login.get("token"), password=login.get("password"))
    except ProcessFailed as exc:
        say(f"Label Studio did not start: {str(exc).splitlines()[0]}")
        return None
    say(f"Label Studio: {server.url} (log in as {server.email}, password {server.password}; project "
        f"{session.get('project')!r})")
    return server


def wait(served: Served, *, poll_s: float = POLL_S) -> None:
    """Block until Ctrl-C or a TERM (KeyboardInterrupt, which the caller turns into a clean stop); RuntimeError
    when a server stops on its own."""
    while True:
        gone = served.exited()
        if gone is not None:
            raise RuntimeError(f"{gone} stopped")
        time.sleep(poll_s)
