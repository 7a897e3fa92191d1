"""The real agent, killed by SIGKILL at one step of an OTA update (a power cut at that instant).

    python -m tests.system.crashagent CONFIG STEP

runs ``flywheel agent run`` on CONFIG with the update path instrumented: the process SIGKILLs itself
right after STEP, one of :data:`STEPS`, the first time that step happens during an update (start-up
loading of the already installed model does not count). ``download`` leaves a half-written file
behind, as a cut mid-transfer would.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

STEPS = ("manifest", "download", "verify", "load", "health", "commit", "state")


def main(config: str, step: str) -> None:
    if step not in STEPS:
        raise SystemExit(f"unknown step {step!r}; expected one of {STEPS}")
    import fleet.edge.ota as ota
    from fleet.edge.agent import Agent
    from fleet.edge.config import load_config
    from fleet.edge.hubclient import HubClient
    from fleet.edge.modelstore import ModelStore

    updating = [False]

    def die() -> None:
        sys.stderr.write(f"crashagent: power cut after step {step!r}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def after(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            if updating[0] and name == step:
                if name == "download":
                    dest = Path(args[2] if len(args) > 2 else kwargs["dest"])
                    data = dest.read_bytes()
                    dest.write_bytes(data[: len(data) // 2])
                die()
            return out
        return wrapper

    def before(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if updating[0] and name == step:
                die()
            return fn(*args, **kwargs)
        return wrapper

    follow = ota.OtaManager._follow_active

    def follow_active(self: Any, ref: Any) -> None:
        updating[0] = True
        try:
            follow(self, ref)
        finally:
            updating[0] = False

    ota.OtaManager._follow_active = follow_active  # type: ignore[method-assign]
    HubClient.get_manifest = after("manifest", HubClient.get_manifest)  # type: ignore[method-assign]
    HubClient.download_model = after("download", HubClient.download_model)  # type: ignore[method-assign]
    # the download hashes the bytes as they arrive and the OTA compares that hash before loading: a cut
    # right before the load is a cut right after the verification
    ota.ModelRuntime = after("load", before("verify", ota.ModelRuntime))  # type: ignore[misc]
    ota.health_check = after("health", ota.health_check)
    ModelStore.commit = after("commit", ModelStore.commit)  # type: ignore[method-assign]
    ModelStore.write_state = after("state", ModelStore.write_state)  # type: ignore[method-assign]

    agent = Agent(load_config(config))
    try:
        agent.run()
    finally:
        agent.close()
    raise SystemExit(f"crashagent: the agent stopped without reaching step {step!r}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
