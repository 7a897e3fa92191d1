"""Per-trigger yield: which campaign triggers' uploads turned out to be model errors once labeled.

A labeled case tells the hub whether the model that captured it was wrong: for ``classify``, the accepted label
is another class than the model's top class; for ``detect``, the human's boxes and the model's boxes at or
above its operating threshold (the manifest's ``DetectorSpec.operating_threshold``, 0.5 for a model the hub
does not know) differ: a box missed, a box added, or a matched box of another class, matching one to one at IoU
>= :data:`MATCH_IOU` (box F1 below 1 under :func:`fleet.consensus.detection_f1`). Per campaign and per
trigger that fired on a case (a case several triggers flagged counts for each of them; trigger ``"*"`` counts
each case once):

- ``uploads``, ``bytes``: the cases it flagged and their image bytes;
- ``labeled``, ``errors``: those with an accepted label, and those among them the model got wrong;
- ``yield_ = errors / labeled``, ``labels_per_error = labeled / errors``, ``bytes_per_error = bytes / errors``.

The database counts (a case's trigger names read from its JSON in SQL, a classifier's error as its label against
its top class); only a detector's cases with an accepted label are read into Python, in chunks (:data:`CHUNK`),
to match their boxes. Nothing else of a case's JSON is decoded outside the database, however many there are.
``/metrics`` reads them through :func:`recent_yields`, counted at most ``metrics_yields_max_age_s`` ago.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from fleet.hub.context import Hub
from fleet.hub.models import CaseRow, ModelVersion
from fleet.protocol import Box, Detection, TriggerYield, YieldReport

ALL = "*"  # the campaign's row: every case once
MATCH_IOU = 0.5
DEFAULT_OPERATING = 0.5
CHUNK = 5_000


def trigger_yields(s: Session, *, campaign_id: str | None = None) -> YieldReport:
    """The yield of every (campaign, trigger) pair, or of one campaign's triggers; sorted by campaign, then
    trigger (``"*"`` first). The database counts (:func:`_counted`); only the detectors' cases with an accepted
    label are read here, to match their boxes."""
    tally: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # uploads, bytes, labeled, errors
    for cid, name, *counts in _counted(s, campaign_id):
        tally[(cid, name)] = counts
    q = select(CaseRow.campaign_id, CaseRow.payload, CaseRow.label_payload, CaseRow.model_version) \
        .where(col(CaseRow.campaign_id).is_not(None), CaseRow.state == "labeled", CaseRow.label_status == "accepted",
               CaseRow.task == "detect")
    if campaign_id is not None:
        q = q.where(CaseRow.campaign_id == campaign_id)
    thresholds = _operating_thresholds(s)
    for cid, payload, label_payload, version in s.exec(q.execution_options(yield_per=CHUNK)):
        wrong = model_wrong("detect", None, None, payload, label_payload, thresholds.get(version, DEFAULT_OPERATING))
        for name in {ALL} | {str(h.get("name")) for h in payload.get("triggers") or () if isinstance(h, dict)}:
            t = tally[(cid, name)]
            t[2] += 1
            t[3] += int(wrong)
    return YieldReport(yields=[_row(cid, name, *t) for (cid, name), t in
                               sorted(tally.items(), key=lambda kv: (kv[0][0], kv[0][1] != ALL, kv[0][1]))])


def recent_yields(hub: Hub, s: Session) -> tuple[YieldReport, float]:
    """Every (campaign, trigger) pair's yield as :func:`trigger_yields` counted it at most
    ``metrics_yields_max_age_s`` ago in this worker (counted now where it is older, or 0), and its age in seconds:
    what a Prometheus scrape reads, so that a scrape every few seconds does not scan every campaign case each time."""
    hit = hub.yields.get("all")
    if hit is not None:
        counted_at, report = hit
        return report, max(0.0, hub.now() - counted_at)
    counted_at, report = hub.now(), trigger_yields(s)
    hub.yields.put("all", (counted_at, report))
    return report, 0.0


def trigger_hits(s: Session, columns: str, where: str) -> str:
    """SQL listing each case ``c`` that matches ``where`` once per trigger name among its hits, as ``name``
    beside its ``columns`` (DISTINCT: a name twice in one case counts once), as this database reads a JSON array
    (a case's triggers are a list: fleet.protocol); a case without hits gives no row."""
    dialect = s.get_bind().dialect.name
    if dialect == "sqlite":
        return (f"SELECT DISTINCT c.case_id, json_extract(t.value, '$.name') AS name, {columns} FROM cases c, "
                f"json_each(c.payload, '$.triggers') t WHERE {where}")
    if dialect == "postgresql":
        return (f"SELECT DISTINCT c.case_id, t.value ->> 'name' AS name, {columns} FROM cases c CROSS JOIN LATERAL "
                f"json_array_elements(c.payload -> 'triggers') AS t(value) WHERE {where}")
    raise NotImplementedError(f"trigger hits are counted in SQLite or PostgreSQL, not {dialect}")


_CASE = "c.campaign_id, c.image_size, c.task, c.label_status, c.label, c.predicted_class"  # what _COUNTS reads
# per case: its bytes, whether a classifier's case has an accepted label, and whether that label is another class
# than the model's top one (a detector's case is counted by trigger_yields, which matches its boxes)
_COUNTS = ("count(*), sum(c.image_size), "
           "sum(CASE WHEN c.label_status = 'accepted' AND c.task <> 'detect' THEN 1 ELSE 0 END), "
           "sum(CASE WHEN c.label_status = 'accepted' AND c.task <> 'detect' AND c.label IS NOT NULL AND "
           "(c.predicted_class IS NULL OR c.label <> c.predicted_class) THEN 1 ELSE 0 END)")


def _counted(s: Session, campaign_id: str | None) -> list[tuple[Any, ...]]:
    """(campaign, trigger, uploads, bytes, labeled, errors) for every trigger name that fired on a campaign's
    cases, and for :data:`ALL`, counted in SQL without decoding a case's JSON here (a detector's labeled cases
    are left to the caller)."""
    one = " AND c.campaign_id = :cid" if campaign_id is not None else ""
    params = {"cid": campaign_id} if campaign_id is not None else {}
    hits = trigger_hits(s, _CASE, f"c.campaign_id IS NOT NULL{one}")
    per_trigger = sa.text(f"SELECT c.campaign_id, c.name, {_COUNTS} FROM ({hits}) AS c WHERE c.name IS NOT NULL "
                          f"GROUP BY c.campaign_id, c.name")
    every = sa.text(f"SELECT c.campaign_id, '{ALL}', {_COUNTS} FROM cases c WHERE c.campaign_id IS NOT NULL{one} "
                    f"GROUP BY c.campaign_id")
    return [(str(r[0]), str(r[1]), *(int(v or 0) for v in r[2:])) for q in (per_trigger, every)
            for r in s.execute(q, params).all()]


def _row(campaign_id: str, trigger: str, uploads: int, size: int, labeled: int, errors: int) -> TriggerYield:
    return TriggerYield(campaign_id=campaign_id, trigger=trigger, uploads=uploads, labeled=labeled, errors=errors,
                        bytes=size, yield_=errors / labeled if labeled else None,
                        labels_per_error=labeled / errors if errors else None,
                        bytes_per_error=size / errors if errors else None)


def model_wrong(task: str, label: int | None, predicted: int | None, payload: dict[str, Any],
                label_payload: dict[str, Any] | None, threshold: float) -> bool:
    """Whether the model that captured a labeled case was wrong on it: another class than the label, or (a
    detector, its boxes scoring at least ``threshold``) boxes that differ from the label's (:func:`boxes_differ`)."""
    if task != "detect":
        return label is not None and label != predicted
    if label_payload is None:
        return False
    model = [b for b in (payload.get("prediction") or {}).get("boxes") or () if float(b["score"]) >= threshold]
    return boxes_differ(model, list(label_payload.get("boxes") or ()))


def boxes_differ(model: Iterable[dict[str, Any]], human: Iterable[dict[str, Any]], *,
                 iou: float = MATCH_IOU) -> bool:
    """True when two box lists (wire ``Box`` dicts: x1, y1, x2, y2, label) do not describe the same objects:
    their box F1 under the consensus rule (:func:`fleet.consensus.detection_f1`: one to one, same class, IoU >=
    ``iou``) is below 1, so a box of either is unmatched (missed, added, or of another class)."""
    from fleet.consensus import detection_f1

    def detection(rows: Iterable[dict[str, Any]]) -> Detection:
        return Detection([Box(x1=float(r["x1"]), y1=float(r["y1"]), x2=float(r["x2"]), y2=float(r["y2"]),
                              label=int(r["label"])) for r in rows])

    return detection_f1(detection(model), detection(human), iou=iou) < 1.0


def _operating_thresholds(s: Session) -> dict[str, float]:
    out = {}
    for version, signed in s.exec(select(ModelVersion.version, ModelVersion.signed_manifest)):
        detector = (signed.get("manifest") or {}).get("detector") or {}
        if "operating_threshold" in detector:
            out[version] = float(detector["operating_threshold"])
    return out
