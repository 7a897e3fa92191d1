"""``flywheel models``, ``flywheel campaigns`` and ``flywheel devices``: a running hub's model registry, campaigns
and enrolled devices, over HTTP with an admin token. Requests are built and answers read with fleet.protocol's
messages; a refusal is reported with the hub's reason (fleet.errors.error_for_response) and exits 1.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer

if TYPE_CHECKING:
    from fleet.protocol import LearnedFit, Message

M = TypeVar("M", bound="Message")

models_app = typer.Typer(help="List, promote and roll back model versions.", no_args_is_help=True)
campaigns_app = typer.Typer(help="Apply, list and delete trigger campaigns, and see their yields and refusals.",
                             no_args_is_help=True)

devices_app = typer.Typer(help="List, find and revoke the fleet's enrolled devices.", no_args_is_help=True)

HUB_URL = typer.Option("http://127.0.0.1:8000", "--hub", envvar="FLYWHEEL_HUB_URL", help="The hub's base URL.")
TOKEN = typer.Option(..., "--token", envvar="FLYWHEEL_HUB_TOKEN", help="An admin token for the hub.")


@models_app.callback()
def _models() -> None:
    """List, promote and roll back model versions."""


@campaigns_app.callback()
def _campaigns() -> None:
    """Apply, list and delete trigger campaigns, and see their yields and refusals."""


@devices_app.callback()
def _devices() -> None:
    """List, find and revoke the fleet's enrolled devices."""


def _call(hub: str, token: str, method: str, path: str, answer: type[M], *, body: Message | None = None) -> M:
    """One call to the hub's API: ``body`` sent as JSON, the answer parsed as ``answer``; a failure (no
    answer, a refusal, an answer that breaks the contract) is printed and exits 1."""
    import httpx

    from fleet.errors import FlywheelError, error_for_response

    what = f"{method} {path}"
    headers = {"Authorization": f"Bearer {token}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    try:
        r = httpx.request(method, hub.rstrip("/") + path, headers=headers, timeout=30.0,
                          content=body.to_json() if body is not None else None)
        err = error_for_response(r, what)
        if err is not None:
            raise err
        return answer.from_json(r.content)
    except httpx.HTTPError as exc:
        typer.echo(f"error: cannot reach the hub at {hub}: {exc}", err=True)
        raise typer.Exit(1) from None
    except FlywheelError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _say_none(note: str) -> None:
    """An empty listing says so on stderr, so that a person sees why nothing was printed and stdout stays the list's
    lines only (empty) for a script."""
    typer.echo(note, err=True)


@models_app.command("list")
def models_list(hub: str = HUB_URL, token: str = TOKEN, as_json: bool = typer.Option(False, "--json")) -> None:
    """Every registered version with its parent, status and metrics."""
    from fleet.protocol import ModelList

    models = _call(hub, token, "GET", "/v1/models", ModelList).models
    if as_json:
        typer.echo(json.dumps([m.to_dict() for m in models], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("version", "parent", "status", "metrics")
    for m in models:
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(m.metrics.items()))
        table.add_row(m.version, m.parent_version or "-", m.status, metrics)
    Console().print(table)


@models_app.command("promote")
def models_promote(
    version: str = typer.Argument(...),
    override: bool = typer.Option(False, "--override", help="Make it active now instead of rolling it out to the "
                                  "whole fleet first (recorded with --reason; still undone if every device "
                                  "refuses it)."),
    reason: str = typer.Option("promoted by an operator", help="Recorded with the promotion."),
    hub: str = HUB_URL, token: str = TOKEN,
) -> None:
    """Promote VERSION: the first model at once; over an active one, a rollout to the whole fleet with the
    rollout's checks, completed after FLYWHEEL_HUB_PROMOTE_HOLD_S (or --override: active now)."""
    from fleet.protocol import PromoteRequest, Promotion

    m = _call(hub, token, "POST", f"/v1/models/{version}/promote", Promotion,
              body=_request(PromoteRequest, override=override, reason=reason))
    ro = m.rollout
    held = f"{ro.stage_seconds:g} s" if ro is not None and ro.stage_seconds is not None else "until advanced"
    if ro is None:
        typer.echo(f"{m.version} is {m.status}")
    elif ro.kind == "override":
        typer.echo(f"{m.version} is {m.status} by admin override (rollout {ro.rollout_id} watches it for {held}; "
                   f"undone if the devices refuse it)")
    else:
        typer.echo(f"{m.version} is rolling out to the whole fleet as rollout {ro.rollout_id}; it becomes active "
                   f"after {held} unless the devices' evidence rolls it back (--override makes it active now)")


@models_app.command("rollback")
def models_rollback(
    to: str | None = typer.Option(None, "--to", help="Version to re-activate (default: the previous one)."),
    reason: str = typer.Option("rolled back by an operator", help="Recorded with the rollback."),
    hub: str = HUB_URL, token: str = TOKEN,
) -> None:
    """Roll back the running rollout, or re-activate the previously active version."""
    from fleet.protocol import RollbackReceipt, RollbackRequest

    r = _call(hub, token, "POST", "/v1/models/rollback", RollbackReceipt,
              body=_request(RollbackRequest, to=to, reason=reason))
    typer.echo(f"rolled back {r.rolled_back}; active: {r.active}")


def _fractions(stages: str) -> list[float]:
    try:
        return [float(x) for x in stages.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"--stages must be fractions such as 0.1,0.5,1.0; received {stages!r}") from None


@models_app.command("rollout")
def models_rollout(
    version: str = typer.Argument(...),
    group: str | None = typer.Option(None, "--group", help="Roll it out to this device group only; once done, the "
                                     "group runs it as its own model (default: the whole fleet)."),
    stages: str = typer.Option("0.1,0.5,1.0", "--stages", help="Fractions of the devices (of the group) per stage."),
    stage_seconds: float | None = typer.Option(None, "--stage-seconds", min=0.001,
                                               help="Hold each stage this long (default: until advanced)."),
    hub: str = HUB_URL, token: str = TOKEN,
) -> None:
    """A staged rollout of VERSION with the rollout's checks, to the fleet or to one --group."""
    from fleet.protocol import RolloutCreate, RolloutPublic

    ro = _call(hub, token, "POST", "/v1/rollouts", RolloutPublic,
               body=_request(RolloutCreate, version=version, stages=_fractions(stages), stage_seconds=stage_seconds,
                             group=group))
    where = f"group {ro.group!r}" if ro.group else "the fleet"
    typer.echo(f"{ro.rollout_id}: {ro.version} over {ro.incumbent or '-'} on {where}, stages {ro.stages}")


@models_app.command("groups")
def models_groups(hub: str = HUB_URL, token: str = TOKEN, as_json: bool = typer.Option(False, "--json")) -> None:
    """Every device group, its devices and the model it runs (its own, or the fleet's)."""
    from fleet.protocol import GroupList

    groups = _call(hub, token, "GET", "/v1/groups", GroupList).groups
    if as_json:
        typer.echo(json.dumps([g.to_dict() for g in groups], indent=2))
        return
    if not groups:
        _say_none("no device group yet (no device has enrolled: each joins its agent config's `group`, 'default' "
                  "unless set)")
    for g in groups:
        own = f"its own (before: {g.previous or '-'})" if g.pinned else "the fleet's"
        rollout = f", rollout {g.rollout_id}" if g.rollout_id else ""
        typer.echo(f"{g.group}\t{g.devices} devices\t{g.model or '-'}, {own}{rollout}")


@models_app.command("unpin")
def models_unpin(group: str = typer.Argument(...), hub: str = HUB_URL, token: str = TOKEN) -> None:
    """GROUP runs the fleet's active model again and takes part in fleet rollouts."""
    from fleet.protocol import GroupPublic

    g = _call(hub, token, "DELETE", f"/v1/groups/{group}/model", GroupPublic)
    typer.echo(f"{g.group} runs the fleet's model {g.model or '-'}")


def _trial_line(t: Any) -> str:
    agreement = "-" if t.agreement is None else f"{t.agreement:.3f}"
    return (f"{t.trial_id}  {t.version} beside {t.incumbent} on group {t.group!r}: {t.state}, agreement {agreement} "
            f"over {t.compared}/{t.frames} frames from {t.devices} devices"
            + (f", rollout {t.rollout_id}" if t.rollout_id else ""))


@models_app.command("shadow")
def models_shadow(
    version: str = typer.Argument(...),
    group: str = typer.Option("default", "--group", help="The device group that runs it in shadow."),
    frames: int = typer.Option(1000, "--frames", min=1, help="Frames to compare before the trial is done."),
    hub: str = HUB_URL, token: str = TOKEN,
) -> None:
    """Run VERSION as the challenger beside the active model on one group's devices for --frames frames; read its
    field agreement with `flywheel models shadows`, then `flywheel models shadow-promote TRIAL`."""
    from fleet.protocol import ShadowCreate, ShadowPublic

    t = _call(hub, token, "POST", "/v1/shadows", ShadowPublic,
              body=_request(ShadowCreate, version=version, group=group, frames=frames))
    typer.echo(_trial_line(t))


@models_app.command("shadows")
def models_shadows(hub: str = HUB_URL, token: str = TOKEN,
                   as_json: bool = typer.Option(False, "--json")) -> None:
    """Every shadow trial and its field agreement, newest first."""
    from fleet.protocol import ShadowList

    trials = _call(hub, token, "GET", "/v1/shadows", ShadowList).trials
    if as_json:
        typer.echo(json.dumps([t.to_dict() for t in trials], indent=2))
        return
    if not trials:
        _say_none("no shadow trial yet (`flywheel models shadow VERSION --group GROUP` starts one)")
    for t in trials:
        typer.echo(_trial_line(t))


@models_app.command("shadow-promote")
def models_shadow_promote(
    trial_id: str = typer.Argument(...),
    stages: str = typer.Option("0.1,0.5,1.0", "--stages", help="The canary's stages, fractions of the fleet."),
    hub: str = HUB_URL, token: str = TOKEN,
) -> None:
    """Promote a shadow trial's candidate to a canary (a staged rollout with the usual rollback rules)."""
    from fleet.protocol import RolloutPublic, ShadowPromote

    ro = _call(hub, token, "POST", f"/v1/shadows/{trial_id}/promote", RolloutPublic,
               body=_request(ShadowPromote, stages=_fractions(stages)))
    typer.echo(f"{ro.version} is a canary: rollout {ro.rollout_id}, stages {ro.stages}")


@campaigns_app.command("apply")
def campaigns_apply(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="Trigger spec JSON (or {spec, groups})."),
    group: list[str] = typer.Option([], "--group", help="Aim at this device group (repeatable; default all)."),
    novelty_bank: str | None = typer.Option(None, "--novelty-bank", help="Ship this novelty bank with it."),
    hub: str = HUB_URL, token: str = TOKEN,
) -> None:
    """Create or update a campaign from FILE (validated by the hub with trigger.parse_spec)."""
    try:
        doc = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        typer.echo(f"error: {file} is not JSON: {exc}", err=True)
        raise typer.Exit(2) from None
    from fleet.protocol import CampaignCreate, CampaignReceipt

    given = _request(CampaignCreate.from_dict, doc)  # {spec, groups, novelty_bank}, or a bare spec
    body = _request(replace, given, groups=group or given.groups, novelty_bank=novelty_bank or given.novelty_bank)
    c = _call(hub, token, "POST", "/v1/campaigns", CampaignReceipt, body=body)
    state = "unchanged" if c.already else "applied"
    typer.echo(f"{state}: {c.campaign_id} v{c.version} -> groups {c.groups or ['*']}")


@campaigns_app.command("list")
def campaigns_list(hub: str = HUB_URL, token: str = TOKEN) -> None:
    """The newest version of each live campaign."""
    from fleet.protocol import CampaignList

    campaigns = _call(hub, token, "GET", "/v1/campaigns", CampaignList).campaigns
    if not campaigns:
        _say_none("no live campaign (`flywheel campaigns apply FILE` makes one)")
    for c in campaigns:
        flag = " (expired)" if c.expired else ""
        typer.echo(f"{c.campaign_id}\tv{c.version}\t{','.join(c.groups) or '*'}{flag}")


@campaigns_app.command("rebalance")
def campaigns_rebalance(campaign_id: str = typer.Argument(...), hub: str = HUB_URL, token: str = TOKEN) -> None:
    """Move an auto campaign's trigger budgets towards the triggers whose uploads were errors (a new version)."""
    from fleet.protocol import CampaignReceipt

    c = _call(hub, token, "POST", f"/v1/campaigns/{campaign_id}/rebalance", CampaignReceipt)
    per = (c.spec.get("budgets") or {}).get("per_trigger") or {}
    shares = ", ".join(f"{k} {v['rate_per_s'] * 60:.3g}/min" for k, v in per.items())
    typer.echo(f"{'unchanged' if c.already else 'rebalanced'}: {c.campaign_id} v{c.version}: {shares}")


SHOWN_WEIGHTS = 10  # weights `campaigns learn` prints, the largest first when there are more


@campaigns_app.command("learn")
def campaigns_learn(campaign_id: str = typer.Argument(...), hub: str = HUB_URL, token: str = TOKEN,
                    target_rate: float = typer.Option(0.05, "--target-rate", help="Share of frames it fires on.")
                    ) -> None:
    """Fit the campaign's learned trigger (is the model wrong on this frame? for a detector: how many boxes does
    it get wrong?) for each model its devices run, on that model's labeled cases, and publish it as a new campaign
    version; prints each model's fit, the fleet's active model's first, and why any model was not fitted."""
    from fleet.protocol import LearnedFit

    fit = _call(hub, token, "POST", f"/v1/campaigns/{campaign_id}/learn?target_rate={target_rate}", LearnedFit)
    for each in (fit, *fit.others):
        typer.echo(_fit_line(each))
    for model, why in fit.not_fitted.items():
        typer.echo(f"not fitted for model {model}: {why}")


def _fit_line(fit: LearnedFit) -> str:
    items = list(fit.weights.items())
    if len(items) > SHOWN_WEIGHTS:  # a detector's 44: the largest, and how small the rest are
        items.sort(key=lambda kv: -abs(kv[1]))
        rest = f" and {len(items) - SHOWN_WEIGHTS} more of |w| <= {abs(items[SHOWN_WEIGHTS][1]):.2f}"
        items = items[:SHOWN_WEIGHTS]
    else:
        rest = ""
    weights = ", ".join(f"{k} {v:+.2f}" for k, v in items) + rest
    auc = "-" if fit.train_auc is None else f"{fit.train_auc:.3f}"
    return (f"learned: {fit.campaign_id} v{fit.version} for model {fit.model_version} on {fit.cases} cases "
            f"({fit.errors} wrong), training AUC {auc}; {fit.trigger}, bias {fit.bias:+.2f}, {weights}"
            + (f"; {fit.bank_note}" if fit.bank_note else ""))


@campaigns_app.command("yield")
def campaigns_yield(campaign_id: str | None = typer.Argument(None, help="One campaign (default: all)."),
                    hub: str = HUB_URL, token: str = TOKEN,
                    as_json: bool = typer.Option(False, "--json", help="The hub's answer as JSON.")) -> None:
    """What each campaign trigger's uploads were worth once labeled: errors found, yield, labels and bytes per
    error found (trigger '*': the campaign's cases, each once)."""
    from urllib.parse import quote

    from fleet.protocol import YieldReport

    path = "/v1/yields" + (f"?campaign_id={quote(campaign_id)}" if campaign_id else "")
    report = _call(hub, token, "GET", path, YieldReport)
    if as_json:
        typer.echo(report.to_json())
        return
    typer.echo("campaign\ttrigger\tuploads\tlabeled\terrors\tyield\tlabels/error\tKiB/error")
    for y in report.yields:
        typer.echo(f"{y.campaign_id}\t{y.trigger}\t{y.uploads}\t{y.labeled}\t{y.errors}\t"
                   f"{_fmt(y.yield_, '.2f')}\t{_fmt(y.labels_per_error, '.1f')}\t"
                   f"{_fmt(None if y.bytes_per_error is None else y.bytes_per_error / 1024, '.1f')}")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


@campaigns_app.command("refusals")
def campaigns_refusals(campaign_id: str = typer.Argument(...), hub: str = HUB_URL, token: str = TOKEN,
                       as_json: bool = typer.Option(False, "--json", help="The hub's answer as JSON.")) -> None:
    """The devices that could not run a version of CAMPAIGN_ID, and the reason each agent gave."""
    import time

    from fleet.protocol import CampaignRefusals

    report = _call(hub, token, "GET", f"/v1/campaigns/{campaign_id}/refusals", CampaignRefusals)
    if as_json:
        typer.echo(report.to_json())
        return
    if not report.refusals:
        typer.echo(f"no device has refused a version of {campaign_id}")
        return
    typer.echo("version\tdevice\ttimes\tlast refused (UTC)\treason")
    for r in report.refusals:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.refused_at))
        reason = "".join(ch if ch.isprintable() else " " for ch in r.reason)  # a device's words, not our terminal's
        typer.echo(f"v{r.version}\t{r.device_id}\t{r.times}\t{when}\t{reason}")


@campaigns_app.command("delete")
def campaigns_delete(campaign_id: str = typer.Argument(...), hub: str = HUB_URL, token: str = TOKEN) -> None:
    """Withdraw a campaign from every device."""
    from fleet.protocol import CampaignDeleted

    r = _call(hub, token, "DELETE", f"/v1/campaigns/{campaign_id}", CampaignDeleted)
    typer.echo(f"deleted {r.campaign_id} ({r.deleted_versions} versions)")


def _request(build: Callable[..., M], *args: Any, **fields: Any) -> M:
    """A request message built from the command line; a value it refuses is a bad parameter (exit 2)."""
    from fleet.errors import ProtocolError

    try:
        message = build(*args, **fields)
        message.validate()
        return message
    except ProtocolError as exc:
        raise typer.BadParameter(str(exc)) from None


@devices_app.command("list")
def devices_list(search: str = typer.Option("", "--search", "-q", help="Only devices whose id or group holds this "
                                            "text, in any case."),
                 hub: str = HUB_URL, token: str = TOKEN,
                 as_json: bool = typer.Option(False, "--json", help="The devices as a JSON list.")) -> None:
    """Every enrolled device by id (or those --search finds): its group, the model it last ran, when it was last
    heard from, its spool, and whether it is revoked. Read from GET /v1/devices a page at a time."""
    import time
    from urllib.parse import urlencode

    from fleet.protocol import MAX_DEVICES_PAGE, DeviceList, DevicePublic

    devices: list[DevicePublic] = []
    while True:
        query = {"limit": MAX_DEVICES_PAGE, "offset": len(devices), **({"q": search} if search else {})}
        page = _call(hub, token, "GET", f"/v1/devices?{urlencode(query)}", DeviceList)
        devices += page.devices
        if not page.devices or len(devices) >= page.total:
            break
    if as_json:
        typer.echo(json.dumps([d.to_dict() for d in devices], indent=2))
        return
    if not devices:
        _say_none(f"no enrolled device's id or group holds {search!r}" if search else "no device has enrolled yet")
        return

    def utc(t: float | None) -> str:
        return "never" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))

    typer.echo("device\tgroup\tmodel\tlast seen (UTC)\tspool items\tspool KiB\trevoked (UTC)")
    for d in devices:
        typer.echo(f"{d.device_id}\t{d.group}\t{d.model_version or '-'}\t{utc(d.last_seen_at)}\t"
                   f"{_fmt(d.spool_items, 'd')}\t{_fmt(None if d.spool_bytes is None else d.spool_bytes / 1024, '.1f')}"
                   f"\t{'-' if d.revoked_at is None else utc(d.revoked_at)}")


@devices_app.command("revoke")
def devices_revoke(device_id: str = typer.Argument(...), hub: str = HUB_URL, token: str = TOKEN) -> None:
    """Revoke DEVICE_ID (a lost or stolen device): it never enrolls again, and every token it holds stops working."""
    from urllib.parse import quote

    from fleet.protocol import DeviceRevoked

    r = _call(hub, token, "POST", f"/v1/devices/{quote(device_id, safe='')}/revoke", DeviceRevoked)
    typer.echo(f"revoked {r.device_id}: it cannot enroll again; {r.tokens_revoked} token(s) it held stopped working")
