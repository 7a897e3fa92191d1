"""The dashboard's pages, one per part of the loop, read through the same functions as the JSON routes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from sqlmodel import col, select

from fleet.errors import InvalidInput
from fleet.hub import lineage, observe, rollouts
from fleet.hub.api import HubDep
from fleet.hub.auth import Principal
from fleet.hub.context import Hub, get_hub
from fleet.hub.db import read_session
from fleet.hub.learned import learned_states
from fleet.hub.models import CampaignRefusalRow, CaseRow, ModelVersion, Rollout
from fleet.hub.routes.campaigns import campaign_list
from fleet.hub.routes.cases import case_row, selected_case
from fleet.hub.routes.devices import device_page, fleet_counts
from fleet.hub.routes.groups import group_list
from fleet.hub.routes.labels import acked
from fleet.hub.routes.models import model_public
from fleet.hub.ui import charts, figures, filters
from fleet.hub.ui.session import clear_session, current_admin, login, set_session
from fleet.hub.yields import trigger_yields

router = APIRouter(prefix="/ui", include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).with_name("templates"))
templates.env.filters.update(ago=filters.ago, utc=filters.utc, day=filters.day, pct=filters.pct, size=filters.size,
                             prediction=filters.prediction)
GATE_METRICS = ("test_accuracy", "test_map", "test_map_50")  # what training/report.py writes, classify then detect


def _admin(request: Request, hub: Hub = Depends(get_hub)) -> Principal:
    return current_admin(hub, request)


Admin = Annotated[Principal, Depends(_admin)]


def _page(request: Request, name: str, admin: Principal | None, *, status_code: int = 200,
          **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, {"admin": admin, "nav": name.removesuffix(".html"), **context},
                                      status_code=status_code, headers={"Cache-Control": "no-store"})


@router.get("", response_class=HTMLResponse)
@router.get("/", response_class=HTMLResponse)
def index(_: Admin) -> Response:
    return RedirectResponse("/ui/fleet", status_code=303)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request) -> Response:
    return _page(request, "login.html", None, error=None)


@router.post("/login", response_class=HTMLResponse)
async def login_submit(request: Request, hub: HubDep) -> Response:
    """The admin token from the form's body (never a URL): a session cookie and the fleet page, or the form again."""
    async with request.form(max_files=0, max_fields=2) as form:
        token = form.get("token")
    principal = login(hub, token) if isinstance(token, str) else None
    if principal is None:
        return _page(request, "login.html", None, status_code=401,
                     error="That is not an admin token of this hub (unknown, revoked, or of another scope).")
    response = RedirectResponse("/ui/fleet", status_code=303)
    set_session(hub, request, response, str(token))
    return response


@router.post("/logout", response_class=HTMLResponse)
def logout() -> Response:
    response = RedirectResponse("/ui/login", status_code=303)
    clear_session(response)
    return response


DEVICES_SHOWN = 100  # devices a page of the fleet page lists


@router.get("/fleet", response_class=HTMLResponse)
def fleet(request: Request, admin: Admin, hub: HubDep, page: str = "1", q: str = "") -> Response:
    """The fleet's counts, its groups, and its devices a page of :data:`DEVICES_SHOWN` at a time (``?page=N``),
    those whose id or group holds ``?q=`` where one is given."""
    number = _page_number(page)
    search = q.strip()
    with read_session(hub.engine) as s:
        shown = device_page(s, offset=(number - 1) * DEVICES_SHOWN, limit=DEVICES_SHOWN, search=search)
        total, heard, by_model = fleet_counts(s)
        summary = observe.summary(s, events_acked=acked(s))
        groups = group_list(s).groups
    pages = max(1, -(-shown.matching // DEVICES_SHOWN))
    if number > pages:
        raise InvalidInput(f"page {number} is past the last page of devices{f' holding {search!r}' if search else ''}"
                           f" ({pages})")
    chart = charts.bar_chart(list(by_model), {"devices": list(by_model.values())}, title="Devices per model version",
                             fmt="{:.0f}")
    first = (number - 1) * DEVICES_SHOWN
    return _page(request, "fleet.html", admin, devices=shown.devices, total=total, heard=heard, summary=summary,
                 now=hub.now(), chart=chart, groups=groups, search=search, matching=shown.matching, page=number,
                 pages=pages, first=first + 1, last=first + len(shown.devices),
                 prev_href=_fleet_href(search, number - 1) if number > 1 else None,
                 next_href=_fleet_href(search, number + 1) if number < pages else None)


def _fleet_href(search: str, number: int) -> str:
    return "/ui/fleet?" + urlencode({**({"q": search} if search else {}), "page": number})


def _page_number(text: str) -> int:
    """``?page=`` as a whole number from 1, or an InvalidInput naming what was received."""
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise InvalidInput(f"page must be a whole number from 1; received {text[:32]!r}")
    return number


REFUSALS_SHOWN = 50  # the newest campaign refusals on the campaigns page (all: flywheel campaigns refusals ID)


@router.get("/campaigns", response_class=HTMLResponse)
def campaigns(request: Request, admin: Admin, hub: HubDep) -> Response:
    with read_session(hub.engine) as s:
        up = figures.uploads(s, now=hub.now())
        yields = trigger_yields(s).yields
        learned = learned_states(s)
        refusals = s.exec(select(CampaignRefusalRow).order_by(col(CampaignRefusalRow.received_at).desc())
                          .limit(REFUSALS_SHOWN)).all()
    day_chart = charts.bar_chart([d for d, _ in up.by_day], {"uploads": [n for _, n in up.by_day]},
                                 title="Uploads per day (UTC)", fmt="{:.0f}")
    trigger_chart = charts.bar_chart([t for t, _ in up.by_trigger], {"uploads": [n for _, n in up.by_trigger]},
                                     title="Uploads per trigger", fmt="{:.0f}")
    return _page(request, "campaigns.html", admin, campaigns=campaign_list(hub).campaigns, uploads=up,
                 day_chart=day_chart, trigger_chart=trigger_chart, yields=yields, refusals=refusals, learned=learned,
                 refusals_shown=REFUSALS_SHOWN)


@router.get("/queue", response_class=HTMLResponse)
def queue(request: Request, admin: Admin, hub: HubDep) -> Response:
    now = hub.now()
    with read_session(hub.engine) as s:
        queues = observe.summary(s, events_acked=acked(s)).queues
        statuses = figures.label_statuses(s)
        per_hour = figures.labels_per_hour(s, now=now)
        recent = s.exec(select(CaseRow).order_by(col(CaseRow.received_at).desc(), CaseRow.case_id).limit(25)).all()
    chart = charts.bar_chart([h for h, _ in per_hour], {"labels": [n for _, n in per_hour]},
                             title="Labels per hour (UTC, last 24 h)", fmt="{:.0f}")
    cases = [selected_case(hub, r, "") for r in recent]
    return _page(request, "queue.html", admin, queues=queues, statuses=statuses, chart=chart, cases=cases)


@router.get("/models", response_class=HTMLResponse)
def models(request: Request, admin: Admin, hub: HubDep) -> Response:
    with read_session(hub.engine) as s:
        summary = observe.summary(s, events_acked=acked(s))
        rows = s.exec(select(ModelVersion).order_by(col(ModelVersion.uploaded_at))).all()
        outs = s.exec(select(Rollout).order_by(col(Rollout.created_at).desc())).all()
        rollout_list = [rollouts.rollout_status(s, r) for r in outs]
        pins: dict[str, list[str]] = {}
        for pin in rollouts.pinned_groups(s):  # groups that run a version as their own model
            pins.setdefault(pin.version, []).append(pin.group)
    versions = [model_public(r) for r in rows]
    gate = {m.version: _gate_metric(m.metrics) for m in versions}
    chart = charts.bar_chart(
        [m.version for m in versions],
        {"gate metric (test set)": [g[1] if g else None for g in gate.values()],
         "accuracy on labeled field cases": [summary.models[m.version].accuracy if m.version in summary.models
                                             else None for m in versions]},
        title="Accuracy per model version", y_max=1.0, fmt="{:.2f}")
    snapshots = {r.version: lineage.data_snapshot_of(r) for r in rows}
    return _page(request, "models.html", admin, versions=versions, summary=summary, gate=gate, chart=chart,
                 rollouts=rollout_list, snapshots=snapshots, pins=pins)


@router.get("/models/{version}", response_class=HTMLResponse)
def model(version: str, request: Request, admin: Admin, hub: HubDep) -> Response:
    lin = lineage.model_lineage(hub, version)  # NotFound for an unknown version
    with read_session(hub.engine) as s:
        mv = s.get(ModelVersion, version)
        assert mv is not None
        outs = s.exec(select(Rollout).where(Rollout.version == version).order_by(col(Rollout.created_at))).all()
        rollout_list = [rollouts.rollout_status(s, r) for r in outs]
        field = observe.summary(s, events_acked=acked(s)).models.get(version)
        children = s.exec(select(ModelVersion.version).where(ModelVersion.parent_version == version)).all()
    manifest = mv.signed_manifest.get("manifest", {})
    return _page(request, "model.html", admin, model=model_public(mv), lineage=lin, rollouts=rollout_list,
                 field=field, children=children, thresholds=manifest.get("thresholds", {}),
                 task=manifest.get("task", "classify"), gate=_gate_metric(mv.metrics))


@router.get("/cases/{case_id}", response_class=HTMLResponse)
def case(case_id: str, request: Request, admin: Admin, hub: HubDep) -> Response:
    selected = selected_case(hub, case_row(hub, case_id), "")  # a signed, expiring image link, relative to this hub
    influence = lineage.case_influence(hub, case_id)
    return _page(request, "case.html", admin, sc=selected, case=selected.case, influence=influence,
                 names=selected.class_names)


def _gate_metric(metrics: dict[str, float]) -> tuple[str, float] | None:
    for name in GATE_METRICS:
        if name in metrics:
            return name, float(metrics[name])
    return None
