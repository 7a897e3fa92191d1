"""Case ingest, the labeling pool, selections, releases and signed image links."""

from __future__ import annotations

import secrets
from typing import Any, Literal

import numpy as np
import sqlalchemy as sa
from fastapi import APIRouter, Query, Request, Response
from sqlmodel import col, func, select
from starlette.concurrency import run_in_threadpool

from fleet.errors import Conflict, InvalidInput, NotFound, PayloadTooLarge, ProtocolError
from fleet.hub import rescore as rescoring
from fleet.hub.api import (
    DeviceCaller,
    HubDep,
    LabelerCaller,
    ReaderCaller,
    message_body,
    message_response,
    multipart_body,
    request_body,
)
from fleet.hub.auth import check_image_signature, image_query
from fleet.hub.context import Hub
from fleet.hub.db import read_session, write_session
from fleet.hub.ingest import decode_embedding_bytes, ingest_case, model_info
from fleet.hub.ingest_batch import ingest_batch
from fleet.hub.labeled_set import labeled_set
from fleet.hub.models import CaseRow, CaseScore
from fleet.hub.models import Selection as SelectionRow
from fleet.hub.multipart import TooManyParts, parse_form
from fleet.hub.running import active_model
from fleet.hub.selection import (
    assign_clusters,
    get_strategy,
    gradient_embeddings,
    min_cosine_distance,
    pick_balanced,
    resolve_adaptive,
)
from fleet.protocol import (
    CASE_STATES,
    BatchReceipt,
    Case,
    CaseReceipt,
    PoolPage,
    Release,
    SelectedCase,
    Selection,
    SelectionRequest,
    check_name,
    parse_prediction,
)
from trigger.scores import entropy

router = APIRouter(tags=["cases"])
CaseState = Literal["unlabeled", "queued", "labeled", "held", "duplicate"]
assert set(CaseState.__args__) == set(CASE_STATES)  # type: ignore[attr-defined]


@router.post("/v1/cases", status_code=201, response_model=CaseReceipt,
             openapi_extra=multipart_body({"case": "the Case JSON (a field or a file part)",
                                           "image": "the PNG the case names by sha256"}, files=("image",)),
             responses={200: {"model": CaseReceipt, "description": "the case was there already (same content)"}})
async def post_case(request: Request, principal: DeviceCaller, hub: HubDep) -> Response:
    """multipart: ``case`` (Case JSON, a field or a file part) and ``image`` (PNG bytes, a file part)."""
    form = parse_form(await request.body(), request.headers.get("content-type", ""))
    case_part, image_part = form.get("case"), form.get("image")
    if case_part is None or image_part is None:
        raise ProtocolError(f"expected multipart parts 'case' (JSON) and 'image' (PNG); received parts "
                            f"{sorted(form)}")
    status, receipt = await run_in_threadpool(ingest_case, hub, principal, case_part.data, image_part.data)
    return message_response(receipt, status_code=status)


@router.post("/v1/cases/batch", response_model=BatchReceipt,
             openapi_extra=multipart_body({"case_0": "the first Case JSON", "image_0": "its PNG"}, files=("image_0",),
                                          description="case_i and image_i for i = 0..n-1, in pairs"))
async def post_cases(request: Request, principal: DeviceCaller, hub: HubDep) -> Response:
    """multipart: ``case_0``, ``image_0``, ``case_1``, ``image_1``, ... -> one receipt per case, in order.

    Each case is validated and stored exactly as ``POST /v1/cases`` would; one bad case is answered
    ``rejected`` with its 4xx and the rest go on. Only a malformed envelope fails the whole request.
    """
    limit = hub.settings.max_batch_cases
    try:
        form = parse_form(await request.body(), request.headers.get("content-type", ""), max_parts=2 * limit)
    except TooManyParts:
        raise PayloadTooLarge(f"a batch carries at most {limit} cases ({2 * limit} parts: case_i and image_i for "
                              f"i = 0..{limit - 1}); received more") from None
    n = len(form) // 2
    expected = [name for i in range(n) for name in (f"case_{i}", f"image_{i}")]
    if not form or len(form) % 2 or set(form) != set(expected):
        shown = sorted(form)[:8]
        raise ProtocolError(f"expected parts case_i (Case JSON) and image_i (PNG) for i = 0..n-1 in pairs; "
                            f"received {len(form)} part(s) {shown}{' ...' if len(form) > 8 else ''}")
    items = [(form[f"case_{i}"].data, form[f"image_{i}"].data) for i in range(n)]
    results = await run_in_threadpool(ingest_batch, hub, principal, items)
    return message_response(BatchReceipt(results))


@router.get("/v1/cases/{case_id}", response_model=SelectedCase)
def get_case(case_id: str, request: Request, _: ReaderCaller, hub: HubDep) -> Response:
    return message_response(selected_case(hub, case_row(hub, case_id), base_url(hub, request)))


def case_row(hub: Hub, case_id: str) -> CaseRow:
    """The stored case, or NotFound."""
    check_name(case_id, "case_id")
    with read_session(hub.engine) as s:
        row = s.get(CaseRow, case_id)
    if row is None:
        raise NotFound(f"unknown case {case_id!r}")
    return row


@router.get("/v1/cases/{case_id}/preview", response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "the case's frame with its boxes drawn"}})
def preview(case_id: str, _: ReaderCaller, hub: HubDep) -> Response:
    """The case's frame as PNG with the model's boxes drawn (class and score), and the human's and challenger's
    boxes when the case has them; a classifier's case gets its predicted class as a caption."""
    from fleet.hub.preview import render_preview

    check_name(case_id, "case_id")
    with read_session(hub.engine) as s:
        row = s.get(CaseRow, case_id)
    if row is None:
        raise NotFound(f"unknown case {case_id!r}")
    try:
        data = hub.blobs.get(row.image_sha256)
    except KeyError:
        raise NotFound(f"image {row.image_sha256} of case {case_id!r} is missing from the blob store") from None
    info = model_info(hub, row.model_version)
    png = render_preview(data, Case.from_dict(row.payload), list(info.class_names) if info else [])
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@router.get("/v1/pool", response_model=PoolPage)
def pool(request: Request, _: ReaderCaller, hub: HubDep, state: CaseState = Query("unlabeled"),
         limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=2**63 - 1)) -> Response:
    with read_session(hub.engine) as s:
        total = s.exec(select(func.count()).select_from(CaseRow).where(CaseRow.state == state)).one()
        rows = s.exec(select(CaseRow).where(CaseRow.state == state)
                      .order_by(col(CaseRow.uncertainty).desc(), CaseRow.case_id).offset(offset).limit(limit)).all()
    base = base_url(hub, request)
    return message_response(PoolPage(total=total, state=state, cases=[selected_case(hub, r, base) for r in rows]))


@router.post("/v1/cases/{case_id}/release", response_model=Release)
def release(case_id: str, _: LabelerCaller, hub: HubDep) -> Response:
    """Return a queued case to the unlabeled pool (its task was skipped, cancelled or deleted)."""
    check_name(case_id, "case_id")
    with write_session(hub.engine) as s:
        row = s.get(CaseRow, case_id)
        if row is None:
            raise NotFound(f"unknown case {case_id!r}")
        if row.state in ("labeled", "held"):
            raise Conflict(f"case {case_id!r} is {row.state}; delete its annotations to release it")
        if row.state == "queued":
            row.state = "unlabeled"
            row.selection_id = None
            s.add(row)
    return message_response(Release(case_id=case_id, state=row.state))


@router.get("/v1/cases/{case_id}/image", response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "the case's PNG"}})
def image(case_id: str, hub: HubDep, exp: int = Query(...), sig: str = Query(..., max_length=128)) -> Response:
    """The case's PNG, for a link signed by the hub (no bearer: annotators' browsers fetch it)."""
    check_name(case_id, "case_id")
    check_image_signature(hub.settings.url_secret.get_secret_value(), case_id, exp, sig, now=hub.now())
    with read_session(hub.engine) as s:
        sha = s.exec(select(CaseRow.image_sha256).where(CaseRow.case_id == case_id)).first()
    if sha is None:
        raise NotFound(f"unknown case {case_id!r}")
    try:
        data = hub.blobs.get(sha)
    except KeyError:
        raise NotFound(f"image {sha} of case {case_id!r} is missing from the blob store") from None
    # the link is signed and carries no credentials, so any origin may load it: Label Studio's UI fetches
    # task images cross-origin from the annotator's browser
    return Response(data, media_type="image/png",
                    headers={"Cache-Control": "private, max-age=3600", "Access-Control-Allow-Origin": "*"})


MAX_POOL = 20_000


def _pool_order(body: SelectionRequest, score: Any) -> tuple[Any, ...]:
    """The order a selection reads its pool in: the highest scores first, ties by image (the same run for run; a
    case id is not, so a seeded selection repeats); for ``random``, SQL's random(), or by image where the request is
    seeded (the seeded generator then draws)."""
    by_image = (CaseRow.image_sha256, CaseRow.case_id)
    if body.strategy != "random":
        return (score.desc(), *by_image)
    return by_image if body.seed is not None else (func.random(),)


@router.post("/v1/selections", response_model=Selection, openapi_extra=request_body(SelectionRequest))
def select_cases(request: Request, _: LabelerCaller, hub: HubDep,
                 body: SelectionRequest = message_body(SelectionRequest)) -> Response:
    """Pick up to ``budget`` informative, non-redundant cases and move them to ``queued``."""
    strategy = get_strategy(body.strategy)
    if body.strategy == "adaptive":  # the cold start is the active model's: what it trained on
        with read_session(hub.engine) as s:
            mv = active_model(s)
            strategy = resolve_adaptive(None if mv is None else mv.metrics, [] if mv is None else mv.class_names)
    cfg = hub.settings
    if body.budget > cfg.max_selection_budget:
        raise InvalidInput(f"budget {body.budget} is over the limit {cfg.max_selection_budget}")
    states = ["unlabeled"] if body.exclude_queued else ["unlabeled", "queued"]
    # cluster-proportional and typical selection need the whole pool to weigh each cluster's mass
    # these weigh the pool's shape, not its top (entropy: the top by another score than the stored one)
    whole = ("uncertainty+diversity", "typiclust", "adaptive", "badge", "entropy")
    # random: SQL's random() draws the pool; seeded, the pool is read in image order (a hash, blind to the scores)
    # and the seeded generator draws from it, so the same pool gives the same picks
    seeded_random = body.strategy == "random" and body.seed is not None
    pool_n = MAX_POOL if body.strategy in whole or seeded_random else body.budget * cfg.selection_pool_factor
    rng = np.random.default_rng(body.seed)
    # one model's scores and embeddings (fleet.hub.rescore), or each case's capturing model's
    space = rescoring.active_version(hub) if cfg.selection_space == "active" else None
    unc, emb, join = rescoring.space_columns(space)
    tag = sa.null() if body.balance is None else col(CaseRow.payload)["tags"][body.balance].as_string()
    q = select(CaseRow.case_id, unc, emb, CaseRow.image_sha256, tag).select_from(join).where(
        col(CaseRow.state).in_(states), rescoring.in_space(space))
    q = q.order_by(*_pool_order(body, unc))
    with read_session(hub.engine) as s:
        rows = list(s.exec(q.limit(pool_n)).all())
        outside = None if space is None else rescoring.not_rescored(space, tuple(states), failed_too=True)
        n_rest = 0 if outside is None else int(s.exec(select(func.count()).select_from(CaseRow).where(outside)).one())
        rest: list[Any] = []
        if n_rest:  # not yet re-scored: ranked after every re-scored case, by capture-time score, no embeddings
            rq = select(CaseRow.case_id, CaseRow.uncertainty, sa.null(), CaseRow.image_sha256, tag).where(outside)
            rq = rq.order_by(*_pool_order(body, col(CaseRow.uncertainty)))
            rest = list(s.exec(rq.limit(body.budget * cfg.selection_pool_factor)).all())
    labeled = labeled_set(hub, space)  # indexed once per worker, then grown (fleet.hub.labeled_set)
    rows = [r for r in rows if r[3] not in labeled.shas]
    rest = [r for r in rest if r[3] not in labeled.shas]
    pool_size = len(rows) + n_rest
    ids = [r[0] for r in rows]
    uncertainty = np.asarray([r[1] for r in rows], dtype=np.float64)
    embeddings, with_emb = _embeddings(rows)
    groups = None if body.balance is None else np.asarray(["" if r[4] is None else str(r[4]) for r in rows])
    labeled_emb = None if embeddings is None else labeled.indexes.get(embeddings.shape[1])
    strategy_emb = embeddings
    skipped = np.zeros(0, dtype=np.int64)  # rows no strategy may pick (near-duplicates of labeled cases)
    if body.strategy in ("badge", "entropy") and embeddings is not None:  # the cases with probabilities
        if labeled_emb is not None and len(labeled_emb) and cfg.duplicate_cosine > 0:  # near-duplicates of labeled
            near = min_cosine_distance(embeddings, labeled_emb) < cfg.duplicate_cosine
            skipped = with_emb[near]
            embeddings, with_emb = embeddings[~near], with_emb[~near]
        embeddings, with_emb, probs = _with_probs(hub, space, rows, embeddings, with_emb)
        if body.strategy == "badge":  # BADGE picks in gradient space
            strategy_emb, labeled_emb = (None if probs is None else gradient_embeddings(probs, embeddings)), None
        else:  # entropy top-k: each case's entropy in the model's space is its score
            strategy_emb = embeddings
            if probs is not None:
                uncertainty[with_emb] = entropy(probs, normalize=True)  # in [0, 1], as every score
    picked_local: list[int] = []
    if rows:
        if embeddings is not None:
            sub = pick_balanced(strategy, None if groups is None else groups[with_emb], uncertainty[with_emb],
                                strategy_emb, body.budget, rng=rng, labeled=labeled_emb,
                                dup_threshold=cfg.duplicate_cosine)
            picked_local = [int(with_emb[i]) for i in sub]
        if len(picked_local) < body.budget:  # cases without (comparable) embeddings fill what is left
            left = np.setdiff1d(np.arange(len(rows)), np.concatenate(
                [with_emb if embeddings is not None else np.zeros(0, np.int64), skipped]))
            sub = pick_balanced(strategy, None if groups is None else groups[left], uncertainty[left], None,
                                body.budget - len(picked_local), rng=rng)
            picked_local += [int(left[i]) for i in sub]
    if len(_drop_same_image(picked_local, rows)) < body.budget and rest:  # then the cases not yet re-scored
        seen = {r[3] for r in rows}
        rest = [r for r in rest if r[3] not in seen]
        sub = pick_balanced(strategy, None if groups is None else np.asarray(["" if r[4] is None else str(r[4])
                                                                              for r in rest]),
                            np.asarray([r[1] for r in rest], dtype=np.float64), None,
                            body.budget - len(_drop_same_image(picked_local, rows)), rng=rng)
        base_n = len(rows)
        rows += [rest[int(i)] for i in sub]
        ids += [r[0] for r in rows[base_n:]]
        uncertainty = np.concatenate([uncertainty, [float(r[1]) for r in rows[base_n:]]])
        picked_local += list(range(base_n, len(rows)))
    picked_local = _drop_same_image(picked_local, rows)
    clusters = _clusters(embeddings, with_emb, picked_local)
    selection_id = f"sel-{secrets.token_hex(8)}"
    chosen = [ids[i] for i in picked_local]
    with write_session(hub.engine) as s:
        queued: set[str] = set()
        for start in range(0, len(chosen), 500):
            res = s.execute(sa.update(CaseRow).where(col(CaseRow.case_id).in_(chosen[start:start + 500]),
                                                     col(CaseRow.state).in_(states))
                            .values(state="queued", selection_id=selection_id).returning(CaseRow.case_id))
            queued.update(r[0] for r in res)
        final = [c for c in chosen if c in queued]
        s.add(SelectionRow(selection_id=selection_id, strategy=body.strategy, budget=body.budget,
                           n_selected=len(final), created_at=hub.now(), case_ids=final))
    with read_session(hub.engine) as s:
        by_id = {r.case_id: r for r in s.exec(select(CaseRow).where(col(CaseRow.case_id).in_(final))).all()}
    base = base_url(hub, request)
    cluster_of = dict(zip(chosen, clusters, strict=True))
    score_of = {ids[i]: float(uncertainty[i]) for i in picked_local}
    return message_response(Selection(
        selection_id=selection_id, strategy=body.strategy, budget=body.budget, pool_size=pool_size,
        model_version=space, not_rescored=n_rest,
        cases=[selected_case(hub, by_id[cid], base, cluster=int(cluster_of[cid]), uncertainty=score_of[cid])
               for cid in final]))


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def base_url(hub: Hub, request: Request) -> str:
    return (hub.settings.public_url or str(request.base_url)).rstrip("/")


def selected_case(hub: Hub, row: CaseRow, base: str, *, cluster: int = 0,
                  uncertainty: float | None = None) -> SelectedCase:
    """A stored case as the labeling side sees it, with a fresh signed link to its image; ``uncertainty``: its
    informativeness in the model space a selection used, when not the capturing model's."""
    u = row.uncertainty if uncertainty is None else uncertainty
    info = model_info(hub, row.model_version)
    query = image_query(hub.settings.url_secret.get_secret_value(), row.case_id, hub.settings.image_url_ttl_s,
                        now=hub.now())
    return SelectedCase(
        case=Case.from_dict(row.payload), image_url=f"{base}/v1/cases/{row.case_id}/image?{query}",
        class_names=list(info.class_names) if info else [], state=row.state,
        score=round(1.0 - u, 6), uncertainty=u, received_at=row.received_at,
        cluster=cluster, duplicate_of=row.duplicate_of, selection_id=row.selection_id,
        label=None if row.label_payload is None else parse_prediction(row.label_payload, "label"),
        label_status=row.label_status,
    )


def _embeddings(rows: list[Any]) -> tuple[np.ndarray | None, np.ndarray]:
    """The pool's embeddings of its most common width, and their rows."""
    dims = [len(r[2]) // 2 if r[2] else 0 for r in rows]
    widths = [d for d in dims if d > 0]
    if not widths:
        return None, np.zeros(0, dtype=np.int64)
    width = max(set(widths), key=widths.count)
    with_emb = np.asarray([i for i, d in enumerate(dims) if d == width], dtype=np.int64)
    emb = np.stack([decode_embedding_bytes(rows[i][2]) for i in with_emb])  # type: ignore[misc]
    return emb, with_emb


def _with_probs(hub: Hub, space: str | None, rows: list[Any], embeddings: np.ndarray, with_emb: np.ndarray
                ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
    """The rows of ``with_emb`` whose class probabilities in ``space``'s model are known (the capture's for a case
    that model captured, else its ``case_scores`` row's): their embeddings, their rows and the probabilities (n, k),
    for BADGE's gradient embeddings and entropy top-k. Rows without probabilities (a detector's case, one scored
    before the hub kept probabilities) are left to the fallback without embeddings."""
    ids = [rows[i][0] for i in with_emb]
    probs: dict[str, np.ndarray] = {}
    with read_session(hub.engine) as s:
        for start in range(0, len(ids), 1000):
            chunk = ids[start:start + 1000]
            own = select(CaseRow.case_id, CaseRow.payload).where(col(CaseRow.case_id).in_(chunk))
            if space is not None:
                own = own.where(CaseRow.model_version == space)
            for cid, payload in s.exec(own).all():
                p = ((payload or {}).get("prediction") or {}).get("probs")
                if p:
                    probs[cid] = np.asarray(p, dtype=np.float32)
            if space is not None:
                for cid, raw in s.exec(select(CaseScore.case_id, CaseScore.probs).where(
                        col(CaseScore.case_id).in_(chunk), CaseScore.model_version == space,
                        col(CaseScore.probs).is_not(None))).all():
                    probs.setdefault(cid, np.frombuffer(raw, dtype="<f4"))
    widths = [len(probs[c]) for c in ids if c in probs]
    if not widths:
        return None, np.zeros(0, dtype=np.int64), None
    k = max(set(widths), key=widths.count)
    keep = np.asarray([j for j, c in enumerate(ids) if c in probs and len(probs[c]) == k], dtype=np.int64)
    return embeddings[keep], with_emb[keep], np.stack([probs[ids[j]] for j in keep]).astype(np.float64)


def _drop_same_image(picked: list[int], rows: list[Any]) -> list[int]:
    seen: set[str] = set()
    out = []
    for i in picked:
        if rows[i][3] not in seen:
            seen.add(rows[i][3])
            out.append(i)
    return out


def _clusters(embeddings: np.ndarray | None, with_emb: np.ndarray, picked: list[int]) -> np.ndarray:
    if embeddings is None or not picked:
        return np.zeros(len(picked), dtype=np.int64)
    pos = {int(r): j for j, r in enumerate(with_emb)}
    local = [pos[i] for i in picked if i in pos]
    if len(local) != len(picked):
        return np.zeros(len(picked), dtype=np.int64)
    return assign_clusters(embeddings, np.asarray(local, dtype=np.int64))
