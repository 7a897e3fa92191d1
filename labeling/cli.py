"""``flywheel label``: keep Label Studio and the hub in step (``sync``) and see how the queue is doing (``status``)."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import typer

from fleet.errors import FlywheelError

app = typer.Typer(name="label", help="Keep Label Studio and the hub in step.", no_args_is_help=True,
                  add_completion=False)
log = logging.getLogger(__name__)

HubUrl = typer.Option("http://127.0.0.1:8000", "--hub-url", envvar="FLYWHEEL_HUB_URL", help="The hub's base URL.")
HubToken = typer.Option("", "--hub-token", envvar="FLYWHEEL_LABELER_TOKEN", help="A hub token with scope labeler.")
LsUrl = typer.Option("http://127.0.0.1:8080", "--ls-url", envvar="FLYWHEEL_LS_URL", help="Label Studio's base URL.")
LsToken = typer.Option("", "--ls-token", envvar="FLYWHEEL_LS_TOKEN",
                       help="A Label Studio API token (legacy token or personal access token) of an admin.")
Project = typer.Option("Flywheel", "--project", envvar="FLYWHEEL_LS_PROJECT", help="Label Studio project title.")
State = typer.Option(None, "--state", envvar="FLYWHEEL_LABEL_STATE",
                     help="The bridge's ledger (SQLite); default ~/.flywheel/labeling-<project>.sqlite.")


def _state_path(state: Path | None, project: str) -> Path:
    if state is not None:
        return state
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in project)
    return Path.home() / ".flywheel" / f"labeling-{safe}.sqlite"


def _open_ledger(path: Path) -> Any:
    """The bridge's ledger at ``path``; one that cannot be opened is a clear error (exit 2), not a traceback."""
    from labeling.ledger import Ledger

    try:
        return Ledger(path)
    except FlywheelError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def sync(
    hub_url: str = HubUrl,
    hub_token: str = HubToken,
    ls_url: str = LsUrl,
    ls_token: str = LsToken,
    project: str = Project,
    state: Path = State,  # noqa: B008
    watch: bool = typer.Option(False, "--watch", help="Keep syncing every --interval seconds until stopped."),
    interval: float = typer.Option(10.0, "--interval", min=0.5, help="Seconds between turns with --watch."),
    overlap: int = typer.Option(2, "--overlap", min=1, max=20, help="Annotators per task in the overlap share."),
    overlap_share: float = typer.Option(0.2, "--overlap-share", min=0.0, max=1.0,
                                        help="Share of tasks labeled by --overlap annotators."),
    strategy: str = typer.Option("uncertainty+diversity", "--strategy", help="The hub's selection strategy."),
    balance: str = typer.Option("", "--balance", help="A case tag (e.g. condition): the hub splits each selection's "
                                "budget evenly over the tag's values in the pool (default: over the whole pool)."),
    seed: int = typer.Option(None, "--seed", min=0, max=2**63 - 1,  # noqa: B008
                             help="Seeds the hub's selection, so the same pool gives the same picks "
                                  "(default: unseeded)."),
    horizon: float = typer.Option(900.0, "--horizon", min=1.0,
                                  help="Seconds of annotator work to keep queued (sets the target depth)."),
    min_depth: int = typer.Option(20, "--min-depth", min=0, help="Smallest queue depth, in annotations."),
    max_depth: int = typer.Option(2000, "--max-depth", min=1, help="Largest queue depth, in annotations."),
    reconcile_every: float = typer.Option(60.0, "--reconcile-every", min=0.0,
                                          help="Seconds between full reconciliation passes."),
    webhook_url: str = typer.Option("", "--webhook-url", envvar="FLYWHEEL_WEBHOOK_URL",
                                    help="URL Label Studio posts webhooks to (default: the hub's inbox)."),
    webhook_secret: str = typer.Option("", "--webhook-secret", envvar="FLYWHEEL_WEBHOOK_SECRET",
                                       help="The hub's webhook secret; without it no webhook is registered."),
    classes: str = typer.Option("", "--classes", help="Comma-separated class names (default: from the hub)."),
    task: str = typer.Option("classify", "--task",
                             help="The cases' task: 'classify' (choices) or 'detect' (boxes, RectangleLabels)."),
    gold: Path = typer.Option(None, "--gold", exists=True, dir_okay=False, readable=True,  # noqa: B008
                              help="JSONL of {case_id, label}: push these as gold tasks once "
                              "(label: a class index, or a detect label {\"task\": \"detect\", \"boxes\": [...]})."),
    cluster_budget: float = typer.Option(10.0, "--cluster-budget", min=0.0,
                                         help="Seconds a turn spends setting Label Studio's per-prediction "
                                              "diversity cluster (the queue is already round-robin over clusters)."),
    no_push: bool = typer.Option(False, "--no-push", help="Only bring labels back; push nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print each turn's report as JSON."),
) -> None:
    """Push the hub's selection to Label Studio and bring labels back, once or with --watch."""
    from labeling.bridge import Bridge
    from labeling.config import BridgeConfig
    from labeling.hub_client import HubClient
    from labeling.studio import Studio
    from labeling.throttle import Throttle

    _need(hub_token, "--hub-token / FLYWHEEL_LABELER_TOKEN")
    _need(ls_token, "--ls-token / FLYWHEEL_LS_TOKEN")
    try:
        config = BridgeConfig(
            project_title=project, task=task, overlap=overlap, overlap_share=overlap_share,
            strategy=strategy, balance=balance or None, selection_seed=seed,
            throttle=Throttle(horizon_s=horizon, min_depth=min_depth, max_depth=max_depth),
            reconcile_every_s=reconcile_every,
            webhook_url=(webhook_url or f"{hub_url.rstrip('/')}/v1/labeling/webhook") if webhook_secret else None,
            webhook_secret=webhook_secret or None,
            class_names=tuple(c.strip() for c in classes.split(",") if c.strip()),
            cluster_budget_s=cluster_budget,
        )
    except FlywheelError as exc:
        raise typer.BadParameter(str(exc)) from None
    ledger = _open_ledger(_state_path(state, project))
    studio = Studio(ls_url, ls_token)
    hub = HubClient(hub_url, hub_token)
    bridge = Bridge(studio, hub, ledger, config)
    stop = threading.Event()
    if watch:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    failed = False
    try:
        if gold is not None:
            _push_gold(bridge, gold)
        while True:
            started = time.monotonic()
            report = bridge.sync_once(push=not no_push, reconcile=True if not watch else None)
            failed = bool(report.errors)
            _print_report(report.as_dict(), as_json)
            if not watch or stop.wait(max(interval - (time.monotonic() - started), 0.0)):
                break
    finally:
        studio.close()
        hub.close()
        ledger.close()
    if failed and not watch:
        raise typer.Exit(1)


@app.command()
def status(
    project: str = Project,
    state: Path = State,  # noqa: B008
    window: float = typer.Option(600.0, "--window", min=1.0, help="Seconds of history for throughput."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Queue depth, annotator throughput, agreement and delivery delay, from the bridge's ledger."""
    from labeling.status import collect

    path = _state_path(state, project)
    if not path.exists():
        typer.echo(f"no ledger at {path}: run 'flywheel label sync' first (or pass --state)", err=True)
        raise typer.Exit(2)
    ledger = _open_ledger(path)
    try:
        info = collect(ledger, window_s=window)
    finally:
        ledger.close()
    if as_json:
        typer.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    _print_status(info)


@app.command()
def bots(
    ls_url: str = LsUrl,
    ls_token: str = LsToken,
    project: str = Project,
    truth: Path = typer.Option(..., "--truth", exists=True, dir_okay=False, readable=True,  # noqa: B008
                               help="JSONL of {case_id, label}: the answers bots know (a class "
                               "index, or a detect label {\"task\": \"detect\", \"boxes\": [...]}), and "
                               "optionally a stable \"key\" per case (the frame it shows) that seeds its answer."),
    team: str = typer.Option("3x0.9@2", "--team", help="'NxACCURACY@SECONDS' or 'name:accuracy@seconds,...'."),
    skip_rate: float = typer.Option(0.0, "--skip-rate", min=0.0, max=1.0),
    box_jitter: float | None = typer.Option(None, "--box-jitter", min=0.0, max=0.5,
                                            help="Detect: each drawn box's corner noise, as a fraction of the box's "
                                                 "width and height (default 0.03); 0 draws the true boxes."),
    password: str = typer.Option("flywheel-bot-password", "--password", envvar="FLYWHEEL_BOT_PASSWORD"),
    max_tasks: int = typer.Option(0, "--max-tasks", min=0, help="Stop each bot after this many tasks (0: never)."),
    until_idle: bool = typer.Option(False, "--until-idle",
                                    help="Work bot after bot until the queue has nothing left for any of them."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**63 - 1,
                             help="Seeds the answers: each task's answer is drawn from the seed and its case (its "
                                  "--truth key when given), whichever bot takes it."),
    as_json: bool = typer.Option(False, "--json", help="Print the bots' tallies as one JSON object."),
) -> None:
    """Simulated annotators working the project's queue in Label Studio (for the demo and benchmarks)."""
    from dataclasses import replace

    from labeling.bots import BotTeam, parse_bot_specs
    from labeling.studio import Studio

    _need(ls_token, "--ls-token / FLYWHEEL_LS_TOKEN")
    rows = _read_jsonl(truth)
    answers = {str(d["case_id"]): d["label"] for d in rows}
    keys = {str(d["case_id"]): str(d["key"]) for d in rows if d.get("key") is not None}
    specs = [replace(s, skip_rate=skip_rate, **({} if box_jitter is None else {"box_jitter": box_jitter}))
             for s in parse_bot_specs(team)]
    admin = Studio(ls_url, ls_token)
    try:  # Label Studio down, or the token refused: said in a line, after the retries, not as a traceback
        found = admin.find_project(project)
        crew = None if found is None else BotTeam(ls_url, admin, found.id, specs, answers.get, found.class_names,
                                                  password=password, seed=seed, draw_key=keys.get)
    except FlywheelError as exc:
        admin.close()
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if crew is None:  # no such project
        admin.close()
        typer.echo(f"no Label Studio project titled {project!r}: run 'flywheel label sync' first", err=True)
        raise typer.Exit(2)
    try:
        if until_idle:
            crew.run_until_idle()
        else:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: crew.stop.set())
            crew.start(max_tasks=max_tasks or None)
            while any(t.is_alive() for t in crew._threads) and not crew.stop.wait(1.0):
                pass
    finally:
        crew.close()
        admin.close()
    if as_json:
        typer.echo(json.dumps({name: {"answered": s.answered, "correct": s.correct, "skipped": s.skipped,
                                      "errors": s.errors} for name, s in crew.stats.items()}, sort_keys=True))
        return
    for name, s in crew.stats.items():
        typer.echo(f"{name}: {s.answered} answered ({s.correct} correct), {s.skipped} skipped, {s.errors} errors")


# ---------------------------------------------------------------------------------------------


def _need(value: str, what: str) -> None:
    if not value:
        typer.echo(f"Error: {what} is required", err=True)
        raise typer.Exit(2)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise typer.BadParameter(f"{path}:{i} is not JSON ({exc})") from None
        label = row.get("label") if isinstance(row, dict) else None
        if isinstance(label, dict):
            from fleet.errors import ProtocolError
            from fleet.protocol import Classification, parse_prediction

            try:
                parsed = parse_prediction(label, f"{path}:{i} label")
            except ProtocolError as exc:
                raise typer.BadParameter(str(exc)) from None
            row["label"] = parsed.label if isinstance(parsed, Classification) else parsed
        elif not isinstance(label, int) or isinstance(label, bool):
            row = None
        if not isinstance(row, dict) or "case_id" not in row:
            raise typer.BadParameter(f"{path}:{i} must be {{\"case_id\": str, \"label\": int or a detect label}}; "
                                     f"received {line[:80]!r}")
        rows.append(row)
    return rows


def _push_gold(bridge: Any, path: Path) -> None:
    from labeling.push import push_gold

    items = []
    for row in _read_jsonl(path):
        t = bridge.ledger.task(case_id=str(row["case_id"]))
        if t is not None and t.state in ("open", "done", "importing"):
            continue
        items.append((bridge.hub.get_case(str(row["case_id"])), row["label"]))
    if items:
        n = push_gold(bridge, items)
        log.info("pushed %d gold tasks", n)


def _print_report(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(report, sort_keys=True))
        return
    parts = [f"{k}={v}" for k, v in report.items() if k != "errors" and v not in (None, 0)]
    typer.echo("sync: " + (" ".join(parts) or "nothing to do"))
    for e in report["errors"]:
        typer.echo(f"  error: {e}", err=True)


def _print_status(info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    q = info["queue"]
    console.print(f"[bold]queue[/bold]: {q['open_slots']} annotations waiting on {q['tasks'].get('open', 0)} open "
                  f"tasks (target depth {q['target_depth']}); tasks by state {q['tasks']}")
    t = info["throughput"]
    console.print(f"[bold]throughput[/bold]: {t['per_minute']:.2f} annotations/min over the last {t['window_s']:.0f}s")
    a = info["agreement"]
    mean = "n/a" if a["mean_agreement"] is None else f"{a['mean_agreement']:.3f}"
    console.print(f"[bold]agreement[/bold]: mean {mean}; labels by status {a['statuses']}; "
                  f"refused {a['refused']}; hub refused {info['hub_refused']}")
    d = info["delivery"]
    if d["n"]:
        console.print(f"[bold]delivery[/bold]: submission to hub label p50 {d['p50_s']:.2f}s, p95 {d['p95_s']:.2f}s "
                      f"(n={d['n']})")
    if info["annotators"]:
        table = Table("annotator", "gold answers", "gold accuracy")
        for name, s in info["annotators"].items():
            table.add_row(name, str(s["total"]), f"{s['accuracy']:.2f}")
        console.print(table)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
