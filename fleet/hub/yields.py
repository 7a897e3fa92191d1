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

Rows stream from the database in chunks (:data:`CHUNK`), only the columns needed, so memory stays flat however
many cases there are.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from sqlmodel import Session, col, select

from fleet.hub.models import CaseRow, ModelVersion
from fleet.protocol import Box, Detection, TriggerYield, YieldReport

ALL = "*"  # the campaign's row: every case once
MATCH_IOU = 0.5
DEFAULT_OPERATING = 0.5
CHUNK = 5_000


def trigger_yields(s: Session, *, campaign_id: str | None = None) -> YieldReport:
    """The yield of every (campaign, trigger) pair, or of one campaign's triggers; sorted by campaign, then
    trigger (``"*"`` first)."""
    q = select(CaseRow.campaign_id, CaseRow.task, CaseRow.payload, CaseRow.image_size, CaseRow.label_status,
               CaseRow.label, CaseRow.predicted_class, CaseRow.label_payload, CaseRow.model_version) \
        .where(col(CaseRow.campaign_id).is_not(None))
    if campaign_id is not None:
        q = q.where(CaseRow.campaign_id == campaign_id)
    thresholds = _operating_thresholds(s)
    tally: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # uploads, bytes, labeled, errors
    for cid, task, payload, size, status, label, predicted, label_payload, version in \
            s.exec(q.execution_options(yield_per=CHUNK)):
        labeled = status == "accepted"
        wrong = labeled and model_wrong(task, label, predicted, payload, label_payload,
                                        thresholds.get(version, DEFAULT_OPERATING))
        names = {ALL} | {str(h.get("name")) for h in payload.get("triggers") or () if isinstance(h, dict)}
        for name in names:
            t = tally[(cid, name)]
            t[0] += 1
            t[1] += int(size)
            t[2] += int(labeled)
            t[3] += int(wrong)
    return YieldReport(yields=[_row(cid, name, *t) for (cid, name), t in
                               sorted(tally.items(), key=lambda kv: (kv[0][0], kv[0][1] != ALL, kv[0][1]))])


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
