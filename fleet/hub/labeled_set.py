"""The labeled set a hub worker keeps indexed for selection's dedup, per model space (issue 19.3).

Selection skips a candidate whose embedding lies within ``duplicate_cosine`` of a labeled one, and any whose
image a labeled case holds. Reading every labeled embedding and rebuilding a search structure on every selection
costs in proportion to the labeled set; instead each worker keeps, per model space (the active model's, see
:mod:`fleet.hub.rescore`), a :class:`~fleet.hub.selection.CosineIndex` (FAISS) of the labeled embeddings and the
set of their case ids and image hashes. A selection reads only the labeled case ids and hashes, fetches the
embeddings of those it has not indexed yet, and adds them. A case that left the labeled states (a label
withdrawn) makes the worker build that space's index again from scratch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
from sqlmodel import col, select

from fleet.hub.context import Hub
from fleet.hub.db import read_session
from fleet.hub.ingest import decode_embedding_bytes
from fleet.hub.models import CaseRow
from fleet.hub.rescore import in_space, space_columns
from fleet.hub.selection import CosineIndex

LABELED_STATES = ("labeled", "held")
FETCH_CHUNK = 900  # ids per IN (...) query: under SQLite's default limit of bound parameters
_LOCK = threading.Lock()


@dataclass
class LabeledSet:
    """One model space's labeled cases: an index per embedding width, and the case ids and image hashes seen."""

    backend: str
    indexes: dict[int, CosineIndex] = field(default_factory=dict)
    ids: set[str] = field(default_factory=set)
    shas: set[str] = field(default_factory=set)


def labeled_set(hub: Hub, space: str | None) -> LabeledSet:
    """The labeled set in ``space``'s model, brought up to date with the database."""
    backend = hub.settings.similarity_search
    with read_session(hub.engine) as s:
        rows = s.exec(select(CaseRow.case_id, CaseRow.image_sha256)
                      .where(col(CaseRow.state).in_(LABELED_STATES))).all()
    now = {cid for cid, _ in rows}
    with _LOCK:
        sets: dict[str | None, LabeledSet] = hub.stats.setdefault("labeled_sets", {})
        cached = sets.get(space)
        if cached is None or cached.backend != backend or not cached.ids <= now:
            cached = sets[space] = LabeledSet(backend)
        new = sorted(now - cached.ids)
        cached.shas = {sha for _, sha in rows}
        if new:
            _add(hub, cached, space, new)
        return cached


def _add(hub: Hub, labeled: LabeledSet, space: str | None, case_ids: list[str]) -> None:
    _, emb, join = space_columns(space)
    by_width: dict[int, list[np.ndarray]] = {}
    found: set[str] = set()
    with read_session(hub.engine) as s:
        for i in range(0, len(case_ids), FETCH_CHUNK):
            part = case_ids[i:i + FETCH_CHUNK]
            for cid, raw in s.exec(select(CaseRow.case_id, emb).select_from(join)
                                   .where(col(CaseRow.case_id).in_(part), in_space(space))).all():
                found.add(cid)
                if raw:
                    vec = decode_embedding_bytes(raw)
                    assert vec is not None
                    by_width.setdefault(len(vec), []).append(vec)
    for width, vecs in by_width.items():
        index = labeled.indexes.get(width)
        if index is None:
            index = labeled.indexes[width] = CosineIndex(width, backend=labeled.backend)
        index.add(np.stack(vecs))
    # scored in this space (an embedding or none): done; one the space's model has not re-scored yet is looked
    # for again next time
    labeled.ids.update(found)
