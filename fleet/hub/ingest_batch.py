"""Batch case ingest: many cases in one request, one outcome each, stored in one short transaction.

Every case goes through :func:`fleet.hub.ingest.prepare_case`, exactly like a single upload, so one
bad case is refused alone (``rejected`` with the 4xx and detail the single endpoint would give) and
the others are stored. Case ids the hub holds already are answered first; then blobs are written
(content-addressed: a crash leaves at most an orphan blob, which ``flywheel hub sweep-blobs`` removes,
never a row without its blob); then one write transaction inserts the blob rows and the case rows
with a handful of statements, whatever the batch size. Idempotent per case id: the same case again
is ``already``; the id with other content, or from another device, is ``rejected`` 409.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from fleet.errors import Conflict, PermanentError, status_for
from fleet.hub.auth import Principal
from fleet.hub.bodies import loads_or_none
from fleet.hub.context import Hub
from fleet.hub.db import write_connection
from fleet.hub.ingest import (
    _CASE_COLUMNS,
    _JSON_COLUMNS,
    CASE_IDENTITY,
    PreparedCase,
    _dump,
    _undo_blob,
    conflict,
    identities,
    prepare_case,
    settle_duplicates,
    stored_identity,
)
from fleet.hub.quota import admit, throttled
from fleet.protocol import CaseReceipt

log = logging.getLogger(__name__)

CREATED, ALREADY, DUPLICATE, REJECTED = "created", "already", "duplicate", "rejected"


def ingest_batch(hub: Hub, principal: Principal, items: Sequence[tuple[bytes, bytes]]) -> list[CaseReceipt]:
    """Validate and store ``items`` (case JSON, image bytes); one :class:`CaseReceipt` per item, in order (a
    rejected one carries the 4xx and detail the single endpoint would answer). A case id repeated inside
    the batch is answered as if the copies had come one after another.
    """
    results: list[CaseReceipt | None] = [None] * len(items)
    fresh: dict[str, tuple[int, PreparedCase]] = {}  # case id -> its first valid copy in this batch
    repeats: list[tuple[int, PreparedCase]] = []
    for i, (text, image) in enumerate(items):
        try:
            p = prepare_case(hub, principal, text, image)
        except PermanentError as exc:  # bad input, a case of another device, ...: this case only
            results[i] = _rejected(_case_id_of(text, hub.settings.max_json_depth), exc)
            continue
        if p.case.case_id in fresh:
            repeats.append((i, p))
        else:
            fresh[p.case.case_id] = (i, p)
    held = stored_identity(hub, list(fresh))  # the case ids the hub holds already
    new = [(cid, p) for cid, (_, p) in fresh.items() if cid not in held]
    throttled_out: dict[str, CaseReceipt] = {}  # over the fleet's upload caps (fleet.hub.quota): 429, not stored
    if new:
        admission = admit(hub, [(p.case.campaign_id, p.case.campaign_version) for _, p in new])
        for (cid, _), ok in zip(new, admission.granted, strict=True):
            if not ok:
                fault = throttled(admission)
                throttled_out[cid] = CaseReceipt(cid, REJECTED, error_status=status_for(fault), error=str(fault),
                                                 retry_after=admission.retry_after)
                results[fresh.pop(cid)[0]] = throttled_out[cid]
    stored = _store_batch(hub, [p for _, p in fresh.values()], held) if fresh else {}
    for cid, (i, _) in fresh.items():
        results[i] = stored[cid]
    for i, p in repeats:
        if p.case.case_id in throttled_out:
            results[i] = replace(throttled_out[p.case.case_id])
            continue
        first = fresh[p.case.case_id][1]
        answer = stored[p.case.case_id]
        if p.case.case_id in held:  # answered against what the hub holds, like its first copy
            results[i] = _known(p, held[p.case.case_id])
        elif answer.status == REJECTED:
            results[i] = replace(answer)  # refused as its first copy was
        else:
            why = conflict(p.case, tuple(getattr(first.case, k) for k in CASE_IDENTITY))
            results[i] = _result(p.case.case_id, ALREADY) if why is None else _rejected(p.case.case_id, Conflict(why))
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# storage
# ---------------------------------------------------------------------------------------------


def _store_batch(hub: Hub, prepared: list[PreparedCase], held: dict[str, tuple[Any, ...]]) -> dict[str, CaseReceipt]:
    """Answer the case ids the hub holds already (``held``); for the rest, blobs, then one transaction
    for blob rows and case rows. An outcome per case id; a blob written for a case that did not go in
    (its id raced in from elsewhere, or the transaction failed) is removed again if nothing refers to it."""
    out = {p.case.case_id: _known(p, held[p.case.case_id]) for p in prepared if p.case.case_id in held}
    new = [p for p in prepared if p.case.case_id not in held]
    if not new:
        return out
    created_blobs: dict[str, str] = {}  # case id -> blob it created
    for p in new:
        sha, created = hub.blobs.put(p.image, sha256=p.case.image_sha256, verified=True)  # prepare_case hashed it
        if created:
            created_blobs[p.case.case_id] = sha
    try:
        out.update(_store_rows(hub, new))
    except BaseException:
        for sha in created_blobs.values():
            _undo_blob(hub, sha, True)
        raise
    for cid, sha in created_blobs.items():
        if out[cid].status not in (CREATED, DUPLICATE):  # its id raced in from another request
            _undo_blob(hub, sha, True)
    return out


def _store_rows(hub: Hub, prepared: list[PreparedCase]) -> dict[str, CaseReceipt]:
    sqlite = hub.engine.dialect.name == "sqlite"
    p = "?" if sqlite else "%s"
    out: dict[str, CaseReceipt] = {}
    by_id = {x.case.case_id: x for x in prepared}
    with write_connection(hub.engine) as conn:
        cur = conn.connection.cursor()
        try:
            owners = identities(cur, p, list(by_id))
            for cid, owner in owners.items():
                out[cid] = _known(by_id[cid], owner)
            new = sorted((x for x in prepared if x.case.case_id not in owners), key=lambda x: x.case.case_id)
            if not new:
                return out
            order = {x.case.case_id: i for i, x in enumerate(prepared)}  # batch order decides the original
            blobs = sorted({x.row["image_sha256"]: x.row for x in new}.items())  # sorted: one lock order
            now = new[0].row["received_at"]
            cur.execute("INSERT INTO blobs (sha256, size, kind, created_at) VALUES "
                        + ", ".join([f"({p}, {p}, 'image', {p})"] * len(blobs)) + " ON CONFLICT DO NOTHING",
                        [v for sha, row in blobs for v in (sha, row["image_size"], now)])
            shas = [sha for sha, _ in blobs]
            cur.execute(f"SELECT image_sha256, case_id FROM cases WHERE image_sha256 IN ({', '.join([p] * len(shas))}) "
                        f"AND duplicate_of IS NULL ORDER BY received_at DESC, case_id DESC", shas)
            original = dict(cur.fetchall())  # the earliest received wins: it comes last
            for x in sorted(new, key=lambda x: order[x.case.case_id]):
                sha = x.row["image_sha256"]
                if sha in original:
                    x.row["duplicate_of"], x.row["state"] = original[sha], "duplicate"
                else:
                    original[sha] = x.case.case_id
            one = "(" + ", ".join(p if sqlite or c not in _JSON_COLUMNS else f"{p}::json" for c in _CASE_COLUMNS) + ")"
            cur.execute(f"INSERT INTO cases ({', '.join(_CASE_COLUMNS)}) VALUES " + ", ".join([one] * len(new))
                        + " ON CONFLICT (case_id) DO NOTHING RETURNING case_id",
                        [_dump(x.row[c]) if c in _JSON_COLUMNS else x.row[c] for x in new for c in _CASE_COLUMNS])
            inserted = {r[0] for r in cur.fetchall()}
            lost = [x.case.case_id for x in new if x.case.case_id not in inserted]
            if lost:  # PostgreSQL: another request stored the same case id since our first look
                for cid, owner in identities(cur, p, lost).items():
                    out[cid] = _known(by_id[cid], owner)
        finally:
            cur.close()
    stored = [x for x in new if x.case.case_id in inserted]
    kept = settle_duplicates(hub, [x.row["image_sha256"] for x in stored if x.row["duplicate_of"]])
    for x in stored:
        cid = x.case.case_id
        dup = kept.get(x.row["image_sha256"], x.row["duplicate_of"])
        if dup == cid:  # the copy the pool keeps (the first, or one that ranks above it: ingest.copy_rank)
            dup = None
        out[cid] = _result(cid, DUPLICATE if dup else CREATED, duplicate_of=dup)
        if dup:
            log.info("case %s from %s duplicates %s", cid, x.case.device_id, dup)
    return out


def _known(prepared: PreparedCase, stored: tuple[Any, ...]) -> CaseReceipt:
    """The answer for a case id the hub already holds, exactly as the single endpoint gives it."""
    cid = prepared.case.case_id
    why = conflict(prepared.case, stored)
    return _result(cid, ALREADY) if why is None else _rejected(cid, Conflict(why))


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------


def _result(case_id: str | None, status: str, *, duplicate_of: str | None = None) -> CaseReceipt:
    return CaseReceipt(case_id or "", status, duplicate_of=duplicate_of)


def _rejected(case_id: str | None, fault: PermanentError) -> CaseReceipt:
    """The receipt of a refused case: the status and detail the single endpoint answers ``fault`` with."""
    return CaseReceipt(case_id or "", REJECTED, error_status=status_for(fault), error=str(fault)[:4000])


def _case_id_of(text: bytes | str, max_depth: int) -> str | None:
    """The case id a refused part claims, when it has a readable one (for the device's bookkeeping)."""
    value, _error = loads_or_none(text if isinstance(text, str) else text.decode("utf-8", "replace"),
                                  max_depth=max_depth)
    value = value.get("case_id") if isinstance(value, dict) else None
    return value if isinstance(value, str) and len(value) <= 128 else None
