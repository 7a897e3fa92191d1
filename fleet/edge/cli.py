"""``flywheel agent``: enroll a device with the hub, run the shadow-mode agent, show its local state.

Only typer is imported at the top, so ``flywheel agent --help`` is fast on a device; the agent's
modules load when a command runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn

import typer

app = typer.Typer(help="Run the shadow-mode edge agent on a device.", no_args_is_help=True, add_completion=False)

CONFIG = typer.Option(..., "--config", "-c", help="The agent's TOML config file.", exists=False, dir_okay=False)


@app.callback()
def _group() -> None:
    """Run the shadow-mode edge agent on a device."""


@app.command()
def enroll(
    config: Path = CONFIG,
    force: bool = typer.Option(False, "--force", help="Enroll again (with this device's current token) even if "
                               "it already is."),
    enrollment_token: str = typer.Option("", "--enrollment-token", envvar="FLYWHEEL_ENROLLMENT_TOKEN",
                                         help="A one-time token an admin issued for this device id (needed when "
                                              "its credentials are lost, or when the hub requires one)."),
) -> None:
    """Trade the fleet secret for a device token and pin the fleet's model-signing key."""
    from fleet.edge.config import load_config
    from fleet.edge.enrollment import enroll as do_enroll
    from fleet.edge.enrollment import enrollment_path
    from fleet.edge.hubclient import HubClient
    from fleet.errors import FlywheelError
    from fleet.signing import key_id

    _logging()
    try:
        cfg = load_config(config)
        client = HubClient.connect(cfg.hub.url, timeout_s=cfg.hub.timeout_s)
        try:
            got = do_enroll(cfg, client, force=force, enrollment_token=enrollment_token)
        finally:
            client.close()
    except FlywheelError as exc:
        _fail(str(exc))
    typer.echo(f"enrolled {got.device_id} with {cfg.hub.url}; pinned fleet key {key_id(got.fleet_public_key)}; "
               f"credentials in {enrollment_path(cfg.data_dir)}")


@app.command()
def run(
    config: Path = CONFIG,
    max_frames: int | None = typer.Option(None, "--max-frames", min=1, help="Stop after this many frames."),
    source: str | None = typer.Option(
        None, "--source", help="Read this source instead of the config's [source]: KIND:PATH (npz, folder, replay, "
        "video: a video file or folder), camera:/dev/video0, or a stream URL (rtsp://..., http://...). The "
        "config's other [source] keys (max_fps, channels, timeouts...) still apply."),
) -> None:
    """Run the agent until the source ends, --max-frames is reached, or SIGTERM/SIGINT arrives."""
    import dataclasses
    import signal

    from fleet.edge.agent import Agent
    from fleet.edge.config import load_config, source_from_spec
    from fleet.errors import FlywheelError

    _logging()
    try:
        cfg = load_config(config)
        if source is not None:
            cfg = dataclasses.replace(cfg, source=source_from_spec(source, cfg.source, cwd=Path.cwd()))
        agent = Agent(cfg)
    except FlywheelError as exc:
        _fail(str(exc))

    def on_signal(signum: int, _frame: object) -> None:
        import logging

        name = signal.Signals(signum).name
        logging.getLogger("fleet.edge").info("got %s: finishing the batch and shutting down", name)
        agent.stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        summary = agent.run(max_frames=max_frames)
    except FlywheelError as exc:
        _fail(str(exc))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        agent.close()
    typer.echo(json.dumps(summary.__dict__, sort_keys=True))


@app.command()
def status(config: Path = CONFIG) -> None:
    """Show this device's enrollment, models and spool, from its data folder (no network)."""
    from fleet.edge.config import load_config
    from fleet.edge.enrollment import load_enrollment
    from fleet.edge.modelstore import ModelStore
    from fleet.edge.spool import Spool
    from fleet.errors import FlywheelError
    from fleet.signing import key_id

    try:
        cfg = load_config(config)
        enrollment = load_enrollment(cfg.data_dir)
        store = ModelStore(cfg.data_dir / "models", enrollment.fleet_public_key)
        spool = Spool(cfg.data_dir / "spool.db", max_bytes=cfg.spool.max_bytes)
        stats = spool.stats()
        spool.close()
    except FlywheelError as exc:
        _fail(str(exc))
    slots = {}
    for slot in ("active", "previous", "challenger"):
        try:
            stored = store.get(slot)
            slots[slot] = stored.version if stored else None
        except FlywheelError as exc:
            slots[slot] = f"BROKEN: {exc}"
    out = {"device_id": enrollment.device_id, "fleet_key": key_id(enrollment.fleet_public_key), "models": slots,
           "spool": stats.__dict__}
    typer.echo(json.dumps(out, indent=2, sort_keys=True))


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _logging() -> None:
    import logging

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
