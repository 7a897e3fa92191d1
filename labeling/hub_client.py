"""The hub's labeling-bridge endpoints (scope ``labeler``), over httpx.

Faults map to :mod:`fleet.errors`: the network or a 5xx/429 is retryable, anything else permanent.
Calls the hub makes idempotent (labels, releases, acks, reads) are retried here; a selection is not,
because a lost answer leaves its cases queued in the hub: :func:`labeling.push.adopt_orphans` finds
them in the queued pool on the next sync instead.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from fleet.errors import InvalidInput, ProtocolError, TransportError, error_for_response
from fleet.retry import RetryPolicy, retrying

STRATEGIES = ("random", "uncertainty", "uncertainty+diversity")


@dataclass(frozen=True)
class SelectedCase:
    """One case the hub picked for labeling, as the bridge pushes it."""

    case_id: str
    image_url: str
    predicted_class: int
    class_names: tuple[str, ...]
    score: float
    cluster: int
    model_version: str
    probs: tuple[float, ...] = ()
    tags: dict[str, Any] = field(default_factory=dict)

    @property
    def predicted_name(self) -> str:
        return self.class_names[self.predicted_class]

    @classmethod
    def from_json(cls, d: Any) -> SelectedCase:
        if not isinstance(d, dict):
            raise ProtocolError(f"a selected case must be an object; received {type(d).__name__}")
        cid = d.get("case_id")
        if not isinstance(cid, str) or not cid:
            raise ProtocolError(f"case_id must be a non-empty string; received {cid!r}")
        url = d.get("image_url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ProtocolError(f"case {cid}: image_url must be an absolute http(s) URL; received {url!r}")
        names = d.get("class_names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ProtocolError(f"case {cid}: class_names must be a non-empty list of strings; received {names!r}")
        pred = d.get("predicted_class")
        if isinstance(pred, str) and pred in names:
            pred = names.index(pred)
        if isinstance(pred, bool) or not isinstance(pred, int) or not 0 <= pred < len(names):
            raise ProtocolError(f"case {cid}: predicted_class must index class_names {names}; received {pred!r}")
        score = d.get("score")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) \
                or not 0.0 <= score <= 1.0:
            raise ProtocolError(f"case {cid}: score must be a number in [0, 1]; received {score!r}")
        cluster = d.get("cluster", 0)
        if isinstance(cluster, bool) or not isinstance(cluster, int):
            raise ProtocolError(f"case {cid}: cluster must be an integer; received {cluster!r}")
        version = d.get("model_version")
        if not isinstance(version, str) or not version:
            raise ProtocolError(f"case {cid}: model_version must be a non-empty string; received {version!r}")
        probs = d.get("probs") or []
        tags = d.get("tags") or {}
        return cls(cid, url, pred, tuple(names), float(score), int(cluster), version,
                   tuple(float(p) for p in probs if isinstance(p, (int, float))),
                   tags if isinstance(tags, dict) else {"tags": tags})


@dataclass(frozen=True)
class Selection:
    selection_id: str
    strategy: str
    cases: list[SelectedCase]


class HubClient:
    """The hub, as the labeling bridge sees it."""

    def __init__(self, url: str, token: str, *, http: httpx.Client | None = None, timeout_s: float = 30.0,
                 retry: RetryPolicy | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        if not url.startswith(("http://", "https://")):
            raise InvalidInput(f"hub URL must start with http:// or https://; received {url!r}")
        self.url = url.rstrip("/")
        self._own = http is None
        self.http = http or httpx.Client(timeout=timeout_s)
        self.headers = {"Authorization": f"Bearer {token}"}
        self.retry = retry or RetryPolicy()
        self.sleep = sleep
        self.timeout_s = timeout_s

    def close(self) -> None:
        if self._own:
            self.http.close()

    # -----------------------------------------------------------------------------------------

    def select(self, budget: int, *, strategy: str = "uncertainty+diversity", seed: int | None = None) -> Selection:
        """Ask for up to ``budget`` cases; they move to ``queued`` in the hub. Not retried (see module doc)."""
        if strategy not in STRATEGIES:
            raise InvalidInput(f"unknown selection strategy {strategy!r}; valid strategies are {list(STRATEGIES)}")
        if budget < 1:
            raise InvalidInput(f"budget must be at least 1; received {budget}")
        body: dict[str, Any] = {"budget": budget, "strategy": strategy, "exclude_queued": True}
        if seed is not None:
            body["seed"] = seed
        d = self._json("POST", "/v1/selections", json=body, idempotent=False)
        cases = [SelectedCase.from_json(c) for c in d.get("cases") or []]
        return Selection(str(d.get("selection_id", "")), str(d.get("strategy", strategy)), cases)

    def pool(self, state: str, *, limit: int = 100, offset: int = 0) -> tuple[int, list[dict[str, Any]]]:
        d = self._json("GET", "/v1/pool", params={"state": state, "limit": limit, "offset": offset})
        return int(d.get("total", 0)), list(d.get("cases") or [])

    def iter_pool(self, state: str, *, page: int = 500) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        offset = 0
        while True:
            total, cases = self.pool(state, limit=page, offset=offset)
            out += cases
            offset += len(cases)
            if not cases or offset >= total:
                return out

    def get_case(self, case_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/cases/{case_id}")

    def release(self, case_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/cases/{case_id}/release")

    def post_label(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Create, update or delete one annotation's label; the hub is idempotent on its annotation id."""
        return self._json("POST", "/v1/labels", json=payload)

    def events(self, *, after: int | None, limit: int = 500) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if after is not None:
            params["after"] = after
        return list(self._json("GET", "/v1/labeling/events", params=params).get("events") or [])

    def ack(self, up_to: int) -> None:
        self._json("POST", "/v1/labeling/events/ack", json={"up_to": up_to})

    def labels(self, *, case_id: str | None = None, limit: int = 10000, offset: int = 0) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if case_id is not None:
            params["case_id"] = case_id
        return list(self._json("GET", "/v1/labels", params=params).get("labels") or [])

    # -----------------------------------------------------------------------------------------

    def _json(self, method: str, path: str, *, idempotent: bool = True, **kwargs: Any) -> dict[str, Any]:
        what = f"hub {method} {path}"
        r = retrying(self.retry, what, lambda: self._send(method, path, **kwargs), idempotent=idempotent,
                     sleep=self.sleep)
        if r.status_code == 204 or not r.content:
            return {}
        try:
            body = r.json()
        except ValueError:
            raise ProtocolError(f"{what}: expected JSON; received {r.text[:200]!r}") from None
        if not isinstance(body, dict):
            raise ProtocolError(f"{what}: expected a JSON object; received {type(body).__name__}")
        return body

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            r = self.http.request(method, self.url + path, headers=self.headers, timeout=self.timeout_s, **kwargs)
        except httpx.TransportError as exc:
            raise TransportError(f"hub {method} {path}: {type(exc).__name__}: {exc}") from exc
        err = error_for_response(r, f"hub {method} {path}")
        if err is not None:
            raise err
        return r


