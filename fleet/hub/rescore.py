"""Re-scoring the pool with the active model, so selection works in one model's space (issue 18.1).

A case arrives scored and embedded by the model that captured it. Once another model is active, those
scores answer the wrong question (what the *old* model doubted) and the embeddings live in another space.
Re-scoring runs the active model over the stored images (onnxruntime, :mod:`fleet.inference`) in bounded
batches and keeps, per (case, model version), the case's informativeness and embedding in that model's space
(the ``case_scores`` table). It is resumable by construction: each batch takes cases that have no row for the
version yet, so a killed run loses at most the batch in flight, and two runs at once only repeat work
(``ON CONFLICT DO NOTHING``). It runs on demand (``POST /v1/models/{version}/rescore``) or as a worker
(``flywheel hub rescore``, which follows the active model with ``--follow``).

The rules, stated once:

- What is re-scored: cases in the pool (``unlabeled``, ``queued``) first, then the labeled and held ones (so
  dedup against labeled cases compares embeddings of one model), oldest first; never a case of the version's
  own capture (its ``cases`` row already holds that model's scores) nor a duplicate.
- How: a classifier's informativeness is :func:`fleet.hub.selection.informativeness` of the new model's
  softmax, with the human's action where the device saw one. The capturing model's class is no challenger's
  vote: the older model is the weaker one, so where the two disagree it is mostly the old model's error that the
  new one has fixed, and ranking such frames up spent labels on them (Fashion-MNIST, benchmarks/RESULTS.md
  2026-12-05 19:07 and 19:46 UTC: with the vote 0.25 / 0.38 / 0.41 of random's labels, without it 0.26 / 0.36 /
  0.35). A detector's is :func:`fleet.hub.selection.box_informativeness` with the human's boxes and the capturing
  model's boxes as the other model's (two versions that find different boxes: a committee disagreement), kept on
  one screen: without that vote, on detection seed 2 the mAP gate refused turns 3 and 4's retrains and the
  flywheel stayed below the random arm's final mAP (0.460 against 0.473; with it, it got there at 149 of 160
  labels: RESULTS 2026-12-05 17:58, 19:46). A shadow challenger's vote counts in the capture-time score only.
- A case whose image cannot be read or run gets a row with ``error`` set and null scores: it is not tried again,
  and selection treats it as not re-scored.
- Selection (``fleet.hub.routes.cases.select_cases``) with an active model uses only that model's scores and
  embeddings. Cases not yet re-scored by it are ranked after every re-scored one: they fill a budget the
  re-scored pool cannot, by their capture-time informativeness, without embeddings (no clustering or dedup
  across spaces); the selection says how many there were (``Selection.not_rescored``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlmodel import col, select

from fleet.errors import InvalidInput, NotFound
from fleet.hub.context import Hub
from fleet.hub.db import dialect_insert, read_session, write_session
from fleet.hub.ingest import detection_boxes
from fleet.hub.models import CaseRow, CaseScore, ModelVersion
from fleet.hub.rollouts import active_model
from fleet.hub.selection import box_informativeness, informativeness
from fleet.protocol import Case, Classification, Detection, ModelManifest, RescoreProgress, SignedManifest
from trigger.scores import softmax

log = logging.getLogger(__name__)

POOL_STATES = ("unlabeled", "queued")
RESCORE_STATES = (*POOL_STATES, "labeled", "held")
_RUNTIME_LOCK = threading.Lock()


@dataclass
class Scored:
    """One case in a model's space: its informativeness, top class (classifiers) and embedding (float16 bytes)."""

    case_id: str
    uncertainty: float | None
    predicted_class: int | None
    embedding: bytes | None
    embedding_dim: int | None
    error: str | None = None
    probs: bytes | None = None  # a classifier's class probabilities, float32 (BADGE needs them)


def not_rescored(version: str, states: tuple[str, ...] = RESCORE_STATES, *, failed_too: bool = False) -> Any:
    """The condition on ``cases`` for a case in ``states`` that ``version`` has not scored yet (nor tried to:
    with ``failed_too``, also one it could not score, which selection treats alike)."""
    row = [CaseScore.case_id == CaseRow.case_id, CaseScore.model_version == version]
    if failed_too:
        row.append(col(CaseScore.uncertainty).is_not(None))
    return sa.and_(col(CaseRow.state).in_(states), CaseRow.model_version != version, ~sa.exists().where(*row))


def space_columns(space: str | None) -> tuple[Any, Any, Any]:
    """(informativeness, embedding, from-clause) of cases in ``space``'s model: the case's own columns where that
    model captured it (or with no model named), else its ``case_scores`` row for that model."""
    if space is None:
        return col(CaseRow.uncertainty), col(CaseRow.embedding), CaseRow
    own = CaseRow.model_version == space
    join = sa.outerjoin(CaseRow, CaseScore, sa.and_(CaseScore.case_id == CaseRow.case_id,  # type: ignore[arg-type]
                                                    CaseScore.model_version == space))
    unc = sa.case((own, CaseRow.uncertainty), else_=CaseScore.uncertainty)
    emb = sa.case((own, CaseRow.embedding), else_=CaseScore.embedding)
    return unc, emb, join


def in_space(space: str | None) -> Any:
    """The condition, over :func:`space_columns`' from-clause, for a case scored in ``space``'s model."""
    if space is None:
        return sa.true()
    return sa.or_(CaseRow.model_version == space, col(CaseScore.uncertainty).is_not(None))


def remaining(hub: Hub, version: str) -> int:
    with read_session(hub.engine) as s:
        return int(s.exec(select(sa.func.count()).select_from(CaseRow).where(not_rescored(version))).one())


def rescore(hub: Hub, version: str, *, limit: int, batch: int = 64) -> RescoreProgress:
    """Re-score up to ``limit`` cases with ``version`` (a registered model), ``batch`` images per forward pass."""
    if limit < 1 or batch < 1:
        raise InvalidInput(f"limit and batch must be >= 1; received limit={limit}, batch={batch}")
    t0 = time.monotonic()
    runtime = load_runtime(hub, version)
    order = sa.case({s: i for i, s in enumerate(RESCORE_STATES)}, value=CaseRow.state)
    scored = failed = 0
    while scored + failed < limit:
        with read_session(hub.engine) as s:
            rows = s.exec(select(CaseRow.case_id, CaseRow.image_sha256, CaseRow.payload).where(not_rescored(version))
                          .order_by(order, CaseRow.received_at, CaseRow.case_id)
                          .limit(min(batch, limit - scored - failed))).all()
        if not rows:
            break
        results = score_cases(hub, runtime, [(cid, sha, payload) for cid, sha, payload in rows])
        store_scores(hub, version, results)
        failed += sum(r.error is not None for r in results)
        scored += sum(r.error is None for r in results)
    return RescoreProgress(version=version, scored=scored, failed=failed, remaining=remaining(hub, version),
                           seconds=round(time.monotonic() - t0, 3))


def score_cases(hub: Hub, runtime: Any, rows: list[tuple[str, str, dict[str, Any]]]) -> list[Scored]:
    """Run ``runtime`` over the stored images of ``rows`` (case id, image sha256, payload); one result per row."""
    out: dict[str, Scored] = {}
    frames: list[np.ndarray] = []
    ok: list[tuple[str, dict[str, Any]]] = []
    for case_id, sha, payload in rows:
        try:
            frames.append(decode_image(hub.blobs.get(sha)))
            ok.append((case_id, payload))
        except Exception as exc:  # a missing blob, a store fault or an image Pillow cannot read: noted, not retried
            out[case_id] = Scored(case_id, None, None, None, None, error=f"image {sha[:12]}: {exc}"[:500])
    if ok:
        try:
            results = _score(runtime, frames, [p for _, p in ok])
        except Exception:  # onnxruntime refuses the batch (a frame the model cannot take): one by one
            results = [_one(runtime, f, p) for f, (_, p) in zip(frames, ok, strict=True)]
        for (case_id, _), r in zip(ok, results, strict=True):
            r.case_id = case_id
            out[case_id] = r
    return [out[case_id] for case_id, _, _ in rows]


def _one(runtime: Any, frame: np.ndarray, payload: dict[str, Any]) -> Scored:
    try:
        return _score(runtime, [frame], [payload])[0]
    except Exception as exc:  # this frame alone
        return Scored("", None, None, None, None, error=f"model {runtime.version}: {exc}"[:500])


def _score(runtime: Any, frames: list[np.ndarray], payloads: list[dict[str, Any]]) -> list[Scored]:
    out = runtime.run(frames)
    emb = np.asarray(out.embedding, dtype=np.float32)
    if not np.all(np.isfinite(emb)):
        raise ValueError("the model's embedding holds NaN or infinite values")
    raw = [e.astype("<f2").tobytes() for e in emb]
    cases = [Case.from_dict({**p, "embedding": None}) for p in payloads]
    manifest: ModelManifest = runtime.manifest
    if out.detections is not None:
        floor = manifest.detector.operating_threshold if manifest.detector is not None else 0.0
        u = [float(box_informativeness(out.detections.take([i]), human=_boxes(c.human_action),
                                       challenger=_boxes(c.prediction), floor=floor)[0])
             for i, c in enumerate(cases)]
        return [Scored("", u[i], None, raw[i], emb.shape[1]) for i in range(len(cases))]
    temperature = float(manifest.thresholds.get("temperature", 1.0))
    probs = softmax(np.asarray(out.logits, dtype=np.float64), temperature=temperature)
    human = np.asarray([c.human_action.label if isinstance(c.human_action, Classification) else -1 for c in cases])
    u = informativeness(probs, human=human)
    top = probs.argmax(axis=1)
    return [Scored("", float(u[i]), int(top[i]), raw[i], emb.shape[1], probs=probs[i].astype("<f4").tobytes())
            for i in range(len(cases))]


def _boxes(pred: Any) -> Any:
    return detection_boxes([pred]) if isinstance(pred, Detection) else None


def decode_image(data: bytes) -> np.ndarray:
    """A stored PNG (checked at ingest by fleet.hub.images) as a uint8 array, (h, w) or (h, w, 3|4)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if img.mode not in ("L", "RGB", "RGBA"):
            img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else
                              "L" if img.mode in ("1", "I", "I;16", "F") else "RGB")
        return np.asarray(img, dtype=np.uint8)


def store_scores(hub: Hub, version: str, results: list[Scored]) -> None:
    """Insert one ``case_scores`` row per result; a row already there (another worker's) is left alone."""
    if not results:
        return
    now = hub.now()
    values = [{"case_id": r.case_id, "model_version": version, "uncertainty": r.uncertainty,
               "predicted_class": r.predicted_class, "embedding": r.embedding, "embedding_dim": r.embedding_dim,
               "probs": r.probs, "scored_at": now, "error": r.error} for r in results]
    with write_session(hub.engine) as s:
        s.execute(dialect_insert(hub.engine, CaseScore.__table__).values(values)  # type: ignore[attr-defined]
                  .on_conflict_do_nothing())


def load_runtime(hub: Hub, version: str) -> Any:
    """An onnxruntime session for ``version``, from the blob store (its bytes checked against the registry's
    sha256), kept per worker for the latest version asked for."""
    from fleet.inference.runtime import ModelRuntime

    with _RUNTIME_LOCK:
        cached = hub.stats.get("rescore_runtime")
        if cached is not None and cached.version == version:
            return cached
        with read_session(hub.engine) as s:
            mv = s.get(ModelVersion, version)
        if mv is None:
            raise NotFound(f"no model version {version!r}")
        manifest = SignedManifest.from_dict(mv.signed_manifest).manifest
        data = hub.blobs.get(mv.onnx_sha256)
        if hashlib.sha256(data).hexdigest() != mv.onnx_sha256:
            raise InvalidInput(f"model {version!r}: the stored ONNX file does not match its sha256 "
                               f"{mv.onnx_sha256}")
        with tempfile.TemporaryDirectory(prefix="flywheel-rescore-") as tmp:
            path = Path(tmp) / "model.onnx"
            path.write_bytes(data)
            runtime = ModelRuntime(path, manifest, threads=hub.settings.rescore_threads)
        hub.stats["rescore_runtime"] = runtime
        return runtime


def active_version(hub: Hub) -> str | None:
    with read_session(hub.engine) as s:
        mv = active_model(s)
        return None if mv is None else mv.version
