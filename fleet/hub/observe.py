"""Observability: per-worker request metrics, Prometheus text rendering and the JSON summary."""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict

from sqlmodel import Session, col, func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleet.hub import rollouts
from fleet.hub.models import (
    CampaignRefusalRow,
    CaseRow,
    Device,
    FieldMetric,
    LabelRow,
    ModelVersion,
    UploadBucket,
    WebhookEvent,
)
from fleet.protocol import (
    CASE_STATES,
    FIELD_COUNTERS,
    FieldCounts,
    ModelSummary,
    QueueDepths,
    Summary,
    YieldReport,
)

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RequestMetrics:
    """Counts requests and latencies by route template and status (this worker only)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency: dict[tuple[str, str], list[int]] = {}
        self.latency_sum: dict[tuple[str, str], float] = defaultdict(float)

    def middleware(self, app: ASGIApp) -> ASGIApp:
        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            start = time.perf_counter()
            status = 500

            async def send_status(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                await send(message)

            try:
                await app(scope, receive, send_status)
            finally:
                route = scope.get("route")
                path = getattr(route, "path", "unmatched")
                self.observe(scope["method"], path, status, time.perf_counter() - start)

        return wrapped

    def observe(self, method: str, path: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(method, path, status)] += 1
            key = (method, path)
            hist = self.latency.setdefault(key, [0] * (len(BUCKETS) + 1))
            hist[bisect.bisect_left(BUCKETS, seconds)] += 1
            self.latency_sum[key] += seconds

    def render(self) -> list[str]:
        lines = ["# HELP flywheel_http_requests_total HTTP requests handled by this worker.",
                 "# TYPE flywheel_http_requests_total counter"]
        with self.lock:
            for (method, path, status), n in sorted(self.requests.items()):
                lines.append(f'flywheel_http_requests_total{{method="{method}",route="{_esc(path)}",'
                             f'status="{status}"}} {n}')
            lines += ["# HELP flywheel_http_request_seconds Request latency on this worker.",
                      "# TYPE flywheel_http_request_seconds histogram"]
            for (method, path), hist in sorted(self.latency.items()):
                labels = f'method="{method}",route="{_esc(path)}"'
                acc = 0
                for bound, n in zip((*BUCKETS, float("inf")), hist, strict=True):
                    acc += n
                    le = "+Inf" if bound == float("inf") else repr(bound)
                    lines.append(f'flywheel_http_request_seconds_bucket{{{labels},le="{le}"}} {acc}')
                lines.append(f"flywheel_http_request_seconds_sum{{{labels}}} {self.latency_sum[(method, path)]:.6f}")
                lines.append(f"flywheel_http_request_seconds_count{{{labels}}} {acc}")
        return lines


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# ---------------------------------------------------------------------------------------------
# database-backed figures
# ---------------------------------------------------------------------------------------------


def summary(s: Session, *, events_acked: int) -> Summary:
    """Per model version (cases, labels, accuracy on labeled cases, field metrics) and queue depths."""
    states = dict(s.exec(select(CaseRow.state, func.count()).group_by(CaseRow.state)).all())
    per_version: dict[str, ModelSummary] = {}
    cases_by = dict(s.exec(select(CaseRow.model_version, func.count()).group_by(CaseRow.model_version)).all())
    labeled_by = dict(s.exec(select(CaseRow.model_version, func.count())
                             .where(col(CaseRow.label).is_not(None)).group_by(CaseRow.model_version)).all())
    correct_by = dict(s.exec(select(CaseRow.model_version, func.count())
                             .where(col(CaseRow.label).is_not(None), CaseRow.label == CaseRow.predicted_class)
                             .group_by(CaseRow.model_version)).all())
    models = {m.version: m for m in s.exec(select(ModelVersion)).all()}
    for version in sorted(set(models) | set(cases_by)):
        m = models.get(version)
        labeled = int(labeled_by.get(version, 0))
        fm = rollouts.field_metrics(s, version)
        per_version[version] = ModelSummary(
            status=m.status if m else "unknown",
            parent_version=m.parent_version if m else None,
            cases=int(cases_by.get(version, 0)),
            labels=labeled,
            accuracy=(int(correct_by.get(version, 0)) / labeled) if labeled else None,
            field_disagreement=fm.disagreement,
            trigger_rate=fm.trigger_rate,
            challenger_agreement=fm.challenger_agreement,
            health_failures=fm.health_failures,
            field=FieldCounts(**{k: getattr(fm, k) for k in FIELD_COUNTERS}),
            metrics=dict(m.metrics) if m else {},
        )
    pending_events = s.exec(select(func.count()).select_from(WebhookEvent)
                            .where(col(WebhookEvent.id) > events_acked)).one()
    running = rollouts.running_rollout(s)
    active = rollouts.active_model(s)
    return Summary(
        models=per_version,
        queues=QueueDepths(**{state: int(states.get(state, 0)) for state in CASE_STATES},
                           webhook_events_pending=int(pending_events)),
        cases_total=int(sum(states.values())),
        labels_total=int(s.exec(select(func.count()).select_from(LabelRow)).one()),
        devices=int(s.exec(select(func.count()).select_from(Device)).one()),
        active_model=active.version if active is not None else None,
        rollout=rollouts.rollout_status(s, running) if running else None,
    )


def prometheus(s: Session, request_metrics: RequestMetrics, *, events_acked: int,
               yields: tuple[YieldReport, float] | None = None) -> str:
    """The Prometheus text of the hub's state; ``yields``: the per-trigger yields and their age in seconds (None:
    counted now, :func:`fleet.hub.yields.trigger_yields`)."""
    data = summary(s, events_acked=events_acked)
    lines = ["# HELP flywheel_cases Cases held by the hub, by state.", "# TYPE flywheel_cases gauge"]
    for state in CASE_STATES:
        lines.append(f'flywheel_cases{{state="{state}"}} {getattr(data.queues, state)}')
    lines += ["# HELP flywheel_webhook_events_pending Label Studio events not yet acknowledged.",
              "# TYPE flywheel_webhook_events_pending gauge",
              f"flywheel_webhook_events_pending {data.queues.webhook_events_pending}",
              "# HELP flywheel_labels Human labels held.", "# TYPE flywheel_labels gauge",
              f"flywheel_labels {data.labels_total}",
              "# HELP flywheel_devices Enrolled devices.", "# TYPE flywheel_devices gauge",
              f"flywheel_devices {data.devices}",
              "# HELP flywheel_model_info Registered model versions (value 1), by status.",
              "# TYPE flywheel_model_info gauge"]
    for v, m in data.models.items():
        lines.append(f'flywheel_model_info{{version="{_esc(v)}",status="{m.status}"}} 1')
    gauges = [("cases", "Cases reported from this model version."),
              ("labels", "Labeled cases reported from this version."),
              ("accuracy", "Accuracy on labeled cases of this version."),
              ("field_disagreement", "Field disagreement with the human (heartbeats)."),
              ("trigger_rate", "Flagged / seen frames in the field."),
              ("health_failures", "Health failures (heartbeats and OTA reports).")]
    for key, help_text in gauges:
        lines += [f"# HELP flywheel_model_{key} {help_text}", f"# TYPE flywheel_model_{key} gauge"]
        for v, m in data.models.items():
            value = getattr(m, key)
            if value is not None:
                lines.append(f'flywheel_model_{key}{{version="{_esc(v)}"}} {float(value):.6g}')
    counters = s.exec(select(FieldMetric).where(FieldMetric.scope == "all")).all()
    lines += ["# HELP flywheel_field_total Summed device counters per model version.",
              "# TYPE flywheel_field_total counter"]
    for fm in counters:
        for k in FIELD_COUNTERS:
            lines.append(f'flywheel_field_total{{version="{_esc(fm.version)}",counter="{k}"}} {getattr(fm, k)}')
    if yields is None:
        from fleet.hub.yields import trigger_yields

        yields = trigger_yields(s), 0.0
    lines += _yield_lines(*yields)
    lines += ["# HELP flywheel_campaign_refusing_devices Devices that could not run a campaign version "
              "(POST /v1/campaign-refusals).", "# TYPE flywheel_campaign_refusing_devices gauge"]
    refusing = s.exec(select(CampaignRefusalRow.campaign_id, CampaignRefusalRow.version, func.count())
                      .group_by(CampaignRefusalRow.campaign_id, CampaignRefusalRow.version)
                      .order_by(CampaignRefusalRow.campaign_id, CampaignRefusalRow.version)).all()
    for campaign_id, version, n in refusing:
        lines.append(f'flywheel_campaign_refusing_devices{{campaign="{_esc(campaign_id)}",version="{version}"}} {n}')
    lines += ["# HELP flywheel_upload_bucket_tokens Tokens left in an upload cap's bucket at its last draw "
              "(fleet.hub.quota).", "# TYPE flywheel_upload_bucket_tokens gauge"]
    for b in s.exec(select(UploadBucket).order_by(UploadBucket.key)).all():
        lines.append(f'flywheel_upload_bucket_tokens{{bucket="{_esc(b.key)}"}} {b.tokens:.6g}')
    lines += request_metrics.render()
    return "\n".join(lines) + "\n"


def _yield_lines(report: YieldReport, age: float) -> list[str]:
    """Per campaign and trigger (fleet.hub.yields): uploads, labeled and errors found as gauges, and the yield;
    and how long ago they were counted."""
    rows = report.yields
    lines = ["# HELP flywheel_trigger_yields_age_seconds How long ago the flywheel_trigger_* gauges were counted "
             "(FLYWHEEL_HUB_METRICS_YIELDS_MAX_AGE_S).", "# TYPE flywheel_trigger_yields_age_seconds gauge",
             f"flywheel_trigger_yields_age_seconds {age:.6g}"]
    for key, help_text in (("uploads", "Cases a campaign's trigger flagged."),
                           ("labeled", "Of those, cases with an accepted label."),
                           ("errors", "Of those, cases the capturing model got wrong."),
                           ("yield", "Errors found / labeled cases.")):
        lines += [f"# HELP flywheel_trigger_{key} {help_text}", f"# TYPE flywheel_trigger_{key} gauge"]
        for y in rows:
            value = y.yield_ if key == "yield" else getattr(y, key)
            if value is not None:
                lines.append(f'flywheel_trigger_{key}{{campaign="{_esc(y.campaign_id)}",trigger="{_esc(y.trigger)}"}} '
                             f"{float(value):.6g}")
    return lines
