"""``flywheel hub`` (serve, migrate, token, enrollment-token, sweep-blobs, rescore): commands that act on the hub's own
database (run them where the hub runs, with its environment). ``flywheel models`` and ``flywheel campaigns``,
which talk to a running hub over HTTP, are in :mod:`fleet.hub.admin_cli`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(help="Serve the hub and manage its tokens.", no_args_is_help=True)
token_app = typer.Typer(help="Create, list and revoke API tokens (admin, labeler, trainer).", no_args_is_help=True)
app.add_typer(token_app, name="token")


@app.callback()
def _hub() -> None:
    """Serve the hub and manage its tokens."""


# ---------------------------------------------------------------------------------------------
# flywheel hub
# ---------------------------------------------------------------------------------------------


def _settings(data_dir: Path | None, database_url: str | None, dev: bool | None) -> Any:
    """Settings from the environment, with command-line overrides exported so workers see them too; a value the
    settings refuse (a malformed --database-url, a FLYWHEEL_HUB_* variable out of range) is a clear error (exit 2)."""
    from pydantic import ValidationError

    from fleet.hub.settings import HubSettings

    if data_dir is not None:
        os.environ["FLYWHEEL_HUB_DATA_DIR"] = str(data_dir.resolve())
    if database_url is not None:
        os.environ["FLYWHEEL_HUB_DATABASE_URL"] = database_url
    if dev:
        os.environ["FLYWHEEL_HUB_DEV"] = "1"
    try:
        return HubSettings()
    except ValidationError as exc:
        for e in exc.errors():
            where = "FLYWHEEL_HUB_" + "_".join(str(x) for x in e["loc"]).upper()
            received = "" if "received" in e["msg"] else f"; received {str(e.get('input'))[:200]!r}"
            said = e["msg"].removeprefix("Value error, ")  # pydantic's prefix to a validator's own message
            typer.echo(f"error: {where}: {said}{received}", err=True)
        raise typer.Exit(2) from None


def _shown(url: str) -> str:
    """``url`` as the errors show it: the password hidden."""
    import sqlalchemy as sa

    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return repr(url)


def _open_hub(settings: Any, *, pool_size: int = 1, data_dir: bool = False, new_hub_note: str = "") -> Any:
    """An engine on the hub's database, migrated to the newest schema, for the commands that set a hub up or work on
    one (serve, migrate, token create, enrollment-token); with ``data_dir``, the hub's data folder made once the
    database opened (a PostgreSQL hub keeps its blobs there; a SQLite one has made it for its file already). What
    cannot be made or opened (a folder that cannot be created, a database server that is not running, a URL of
    another kind) stops here with what was received and what was expected (exit 2), not a traceback. Where no hub
    was there yet and ``new_hub_note`` says what the command does, a note on stderr says a new one was set up: a
    misdirected --data-dir shows at once, not later as a token the real hub does not know."""
    import sqlalchemy as sa

    from fleet.hub.db import hub_missing, make_engine, migrate
    from fleet.hub.fsperm import private_dir

    url = settings.resolved_database_url()
    try:
        missing = hub_missing(url) if new_hub_note else None
        engine = make_engine(url, pool_size=pool_size)
        migrate(engine)
    except (OSError, ValueError, sa.exc.SQLAlchemyError) as exc:
        first = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [""])[0]
        typer.echo(f"error: cannot open the hub database at {_shown(url)} ({type(exc).__name__}: {first}); "
                   "expected a SQLite file in a folder this user can write, or a PostgreSQL server that is running "
                   "and accepts this user (--data-dir, --database-url, or FLYWHEEL_HUB_DATA_DIR, "
                   "FLYWHEEL_HUB_DATABASE_URL)", err=True)
        raise typer.Exit(2) from None
    if data_dir:
        try:
            private_dir(settings.data_dir)
        except OSError as exc:
            engine.dispose()
            typer.echo(f"error: cannot make the hub's data folder {settings.data_dir}: {exc.strerror or exc}; "
                       "expected a folder this user can create and write (--data-dir or FLYWHEEL_HUB_DATA_DIR)",
                       err=True)
            raise typer.Exit(2) from None
    if missing is not None:
        typer.echo(f"note: no hub database was at {_shown(url)} ({missing}); set up a new one there and "
                   f"{new_hub_note} it. If your hub keeps its data elsewhere, pass its --data-dir or --database-url",
                   err=True)
    return engine


def _existing_hub(settings: Any, *, pool_size: int = 1) -> Any:
    """An engine on the database of a hub that exists, for the commands that work on one (sweep-blobs, rescore,
    token list and revoke): a misdirected one (a wrong --data-dir, a forgotten --database-url) stops here, before it
    makes an empty database (in which every blob would look like an orphan to a sweep)."""
    import sqlalchemy as sa

    from fleet.hub.db import hub_missing, make_engine

    url = settings.resolved_database_url()
    try:
        why = hub_missing(url)
    except (ValueError, sa.exc.ArgumentError) as exc:
        why = str(exc)
    if why is not None:
        typer.echo(f"error: no hub database at {_shown(url)}: {why}; "
                   "expected the database of a hub that `flywheel hub serve` (or `flywheel hub migrate`) has set up: "
                   "check --data-dir and --database-url (or FLYWHEEL_HUB_DATA_DIR, FLYWHEEL_HUB_DATABASE_URL)",
                   err=True)
        raise typer.Exit(2)
    return make_engine(url, pool_size=pool_size)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, min=1, max=65535, help="TCP port."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="SQLite file and blobs (FLYWHEEL_HUB_DATA_DIR)."),
    database_url: str | None = typer.Option(None, "--database-url", help="SQLAlchemy URL (FLYWHEEL_HUB_DATABASE_URL)."),
    dev: bool = typer.Option(False, "--dev", help="Allow the built-in dev secrets (never in production)."),
    workers: int = typer.Option(1, min=1, help="Worker processes (stateless; use PostgreSQL for more than one)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Migrate the database, then serve the hub's HTTP API with uvicorn."""
    import uvicorn

    from fleet.errors import InvalidInput

    settings = _settings(data_dir, database_url, dev)
    try:
        settings.check()
    except InvalidInput as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if settings.dev and not _loopback(host):
        typer.echo(f"error: a dev hub takes the built-in secrets (anyone who reaches it is an admin), so it listens on "
                   f"this machine only; received --host {host!r}; expected 127.0.0.1, ::1 or localhost, or the hub's "
                   "own secrets without dev mode (see `flywheel hub serve` without --dev)", err=True)
        raise typer.Exit(2)
    if settings.dev:
        _dev_banner()
    if settings.blob_store == "s3":  # a bucket that does not answer stops the hub before its database is set up
        _blob_store(settings)
    _open_hub(settings, data_dir=True).dispose()
    url = settings.resolved_database_url()
    if workers > 1 and url.startswith("sqlite"):
        typer.echo(f"note: the {workers} workers share one SQLite file ({_shown(url)}), so their writes take turns; "
                   "PostgreSQL (--database-url postgresql+psycopg://...) lets them write at once", err=True)
    os.environ["FLYWHEEL_HUB_MIGRATE_ON_START"] = "0"  # done once, here, before the workers start
    typer.echo(f"dashboard: http://{host}:{port}/ui (log in with the admin token)", err=True)
    uvicorn.run("fleet.hub.app:create_app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level=log_level, access_log=False)


def _loopback(host: str) -> bool:
    """Whether ``host`` is an address of this machine only (a loopback address, or localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _blob_store(settings: Any) -> Any:
    """The blob store ``settings`` name, checked (a bucket must exist and answer); one that cannot be reached stops the
    command with what was received and what was expected (exit 2), not a traceback."""
    from fleet.errors import FlywheelError
    from fleet.hub.stores import make_blob_store

    try:
        return make_blob_store(settings)
    except (FlywheelError, ValueError) as exc:
        typer.echo(f"error: cannot open the hub's blob store {settings.blob_store_where()}: {exc}", err=True)
        raise typer.Exit(2) from None


def _dev_banner() -> None:
    """A warning no one can miss on the terminal that starts a dev hub."""
    from fleet.hub.settings import DEV_WARNING

    line = "!" * 100
    typer.secho(f"{line}\n!! WARNING: {DEV_WARNING}\n{line}", err=True, fg=typer.colors.RED, bold=True)


@app.command("migrate")
def migrate_cmd(
    data_dir: Path | None = typer.Option(None, "--data-dir"),
    database_url: str | None = typer.Option(None, "--database-url"),
) -> None:
    """Upgrade the database to the newest schema (the hub also does this when it starts)."""
    from fleet.hub.db import current_revision

    engine = _open_hub(_settings(data_dir, database_url, None))
    typer.echo(f"database at revision {current_revision(engine)}")
    engine.dispose()


@token_app.command("create")
def token_create(
    scope: str = typer.Option(..., help="admin, labeler or trainer."),
    name: str = typer.Option(..., help="A unique name, used to revoke it."),
    data_dir: Path | None = typer.Option(None, "--data-dir"),
    database_url: str | None = typer.Option(None, "--database-url"),
) -> None:
    """Create a token and print it (the only time it is shown; the hub keeps its hash)."""
    from sqlalchemy.exc import IntegrityError as DBIntegrityError

    from fleet.errors import ProtocolError
    from fleet.hub.auth import issue_token
    from fleet.hub.db import write_session
    from fleet.protocol import check_name

    if scope not in ("admin", "labeler", "trainer"):
        raise typer.BadParameter(f"scope must be admin, labeler or trainer; received {scope!r}")
    try:
        check_name(name, "token name")
    except ProtocolError as exc:
        raise typer.BadParameter(str(exc)) from None
    import time

    engine = _open_hub(_settings(data_dir, database_url, None), new_hub_note=f"made the {scope} token {name!r} in")
    try:
        with write_session(engine) as s:
            token = issue_token(s, scope=scope, name=name, now=time.time())
    except DBIntegrityError:
        typer.echo(f"error: a token named {name!r} already exists", err=True)
        raise typer.Exit(1) from None
    finally:
        engine.dispose()
    typer.echo(token)


@token_app.command("revoke")
def token_revoke(
    name: str = typer.Argument(..., help="The token's name."),
    data_dir: Path | None = typer.Option(None, "--data-dir"),
    database_url: str | None = typer.Option(None, "--database-url"),
) -> None:
    """Revoke a token by name (workers notice within FLYWHEEL_HUB_TOKEN_CACHE_TTL_S)."""
    import time

    import sqlalchemy as sa

    from fleet.hub.db import write_session
    from fleet.hub.models import ApiToken

    engine = _existing_hub(_settings(data_dir, database_url, None))
    with write_session(engine) as s:
        n = s.execute(sa.update(ApiToken).where(ApiToken.name == name)  # type: ignore[arg-type]
                      .values(revoked_at=time.time())).rowcount
    engine.dispose()
    if not n:
        typer.echo(f"error: no token named {name!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {name}")


@token_app.command("list")
def token_list(
    data_dir: Path | None = typer.Option(None, "--data-dir"),
    database_url: str | None = typer.Option(None, "--database-url"),
) -> None:
    """List the non-device tokens."""
    from sqlmodel import select

    from fleet.hub.db import read_session
    from fleet.hub.models import ApiToken

    engine = _existing_hub(_settings(data_dir, database_url, None))
    with read_session(engine) as s:
        rows = s.exec(select(ApiToken).where(ApiToken.scope != "device").order_by(ApiToken.name)).all()
    engine.dispose()
    for t in rows:
        typer.echo(f"{t.name}\t{t.scope}\t{'revoked' if t.revoked_at else 'active'}")


@app.command("enrollment-token")
def enrollment_token(
    device_id: str = typer.Argument(..., help="The device id it enrolls (new, or again after lost credentials)."),
    group: str | None = typer.Option(None, help="Device group to enroll it into (default: what the device asks)."),
    ttl_s: float | None = typer.Option(None, "--ttl-s", min=1,
                                       help="Life (default FLYWHEEL_HUB_ENROLLMENT_TOKEN_TTL_S)."),
    data_dir: Path | None = typer.Option(None, "--data-dir"),
    database_url: str | None = typer.Option(None, "--database-url"),
) -> None:
    """Print a one-time enrollment token for DEVICE_ID (the device runs 'flywheel agent enroll --enrollment-token')."""
    import time

    from fleet.errors import Conflict, ProtocolError
    from fleet.hub.db import write_session
    from fleet.hub.enrollment import issue_grant
    from fleet.protocol import check_name

    try:
        check_name(device_id, "device_id")
        if group is not None:
            check_name(group, "group")
    except ProtocolError as exc:
        raise typer.BadParameter(str(exc)) from None
    settings = _settings(data_dir, database_url, None)
    engine = _open_hub(settings, new_hub_note=f"made the enrollment token for {device_id!r} in")
    try:
        with write_session(engine) as s:
            token, _expires = issue_grant(s, device_id=device_id, group=group, now=time.time(),
                                          ttl_s=ttl_s or settings.enrollment_token_ttl_s, created_by="cli")
    except Conflict as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        engine.dispose()
    typer.echo(token)


@app.command("sweep-blobs")
def sweep_blobs(
    min_age_s: float = typer.Option(3600.0, "--min-age-s", min=0, help="Leave blobs younger than this "
                                    "(an upload in flight writes its blob before its row)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Count the orphans; remove nothing."),
    data_dir: Path | None = typer.Option(None, "--data-dir"),
    database_url: str | None = typer.Option(None, "--database-url"),
) -> None:
    """Find and remove blobs that no case, model, novelty bank or snapshot refers to; print a JSON report."""
    import time

    from fleet.hub.db import migrate
    from fleet.hub.sweep import sweep_orphan_blobs

    settings = _settings(data_dir, database_url, None)
    engine = _existing_hub(settings)
    try:
        migrate(engine)
        store = _blob_store(settings)
        report = sweep_orphan_blobs(engine, store, now=time.time(), min_age_s=min_age_s, dry_run=dry_run)
    finally:
        engine.dispose()
    typer.echo(json.dumps(report.to_dict(), sort_keys=True))


@app.command("rescore")
def rescore_cmd(
    version: str | None = typer.Option(None, "--version", help="The model to score with (default: the active one)."),
    batch: int = typer.Option(64, "--batch", min=1, max=1024, help="Images per forward pass."),
    follow: bool = typer.Option(False, "--follow", help="Keep running: re-score for whichever model is active, "
                                "checking every --interval-s (a worker beside `flywheel hub serve`)."),
    interval_s: float = typer.Option(10.0, "--interval-s", min=0.1),
    data_dir: Path | None = typer.Option(None, "--data-dir"),
    database_url: str | None = typer.Option(None, "--database-url"),
) -> None:
    """Re-score and re-embed the pool with a model (fleet.hub.rescore); resumable: a stopped run goes on where it
    stopped. Prints progress, then a JSON report of the last version."""
    import time

    from fleet.errors import FlywheelError
    from fleet.hub.context import Hub
    from fleet.hub.db import migrate
    from fleet.hub.rescore import active_version, remaining, rescore

    settings = _settings(data_dir, database_url, None)
    engine = _existing_hub(settings, pool_size=2)
    totals = {"version": version, "scored": 0, "failed": 0, "remaining": 0}
    try:
        migrate(engine)
        hub = Hub(settings=settings, engine=engine, blobs=_blob_store(settings))
        while True:
            target = version or active_version(hub)
            if target is None:
                if not follow:
                    typer.echo("error: no model is active; name one with --version", err=True)
                    raise typer.Exit(1)
                time.sleep(interval_s)
                continue
            if totals["version"] != target:
                totals = {"version": target, "scored": 0, "failed": 0, "remaining": remaining(hub, target)}
            t0 = time.monotonic()
            step = rescore(hub, target, limit=batch * 8, batch=batch)
            totals["scored"] += step.scored
            totals["failed"] += step.failed
            totals["remaining"] = step.remaining
            done = totals["scored"] + totals["failed"]
            if done or step.remaining:
                rate = (step.scored + step.failed) / max(time.monotonic() - t0, 1e-9)
                typer.echo(f"{target}: {done} re-scored ({totals['failed']} failed), {step.remaining} to go, "
                           f"{rate:.0f} cases/s", err=True)
            if step.remaining == 0 and not follow:
                break
            if step.remaining == 0:
                time.sleep(interval_s)
    except KeyboardInterrupt:
        typer.echo("stopped; run the same command again to go on", err=True)
    except FlywheelError as exc:  # an unknown version, a model that does not load
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        engine.dispose()
    typer.echo(json.dumps(totals, sort_keys=True))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
