"""The hub's labeling-bridge endpoints (scope ``labeler``), over httpx.

Faults map to :mod:`fleet.errors`: the network or a 5xx/429 is retryable, anything else permanent.
Calls the hub makes idempotent (labels, releases, acks, reads) are retried here; a selection is not,
because a lost answer leaves its cases queued in the hub: :func:`labeling.push.adopt_orphans` finds
them in the queued pool on the next sync instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from fleet.errors import InvalidInput, ProtocolError, TransportError, error_for_response
from fleet.protocol import (
    Ack,
    EventPage,
    LabelPage,
    LabelPost,
    LabelPublic,
    LabelReceipt,
    PoolPage,
    Release,
    SelectedCase,
    Selection,
    SelectionRequest,
    StoredEvent,
)
from fleet.retry import RetryPolicy, retrying

_JSON = {"Content-Type": "application/json"}


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

    def select(self, budget: int, *, strategy: str = "uncertainty+diversity", seed: int | None = None,
               balance: str | None = None) -> Selection:
        """Ask for up to ``budget`` cases (``balance``: a case tag the hub splits the budget evenly over); they move
        to ``queued`` in the hub. Not retried (see module doc)."""
        try:
            body = SelectionRequest(budget=budget, strategy=strategy, exclude_queued=True, seed=seed, balance=balance)
            body.validate()
        except ProtocolError as exc:
            raise InvalidInput(str(exc)) from None
        return Selection.from_dict(self._json("POST", "/v1/selections", content=body.to_json(), headers=_JSON,
                                              idempotent=False))

    def pool(self, state: str, *, limit: int = 100, offset: int = 0) -> PoolPage:
        return PoolPage.from_dict(self._json("GET", "/v1/pool", params={"state": state, "limit": limit,
                                                                          "offset": offset}))

    def iter_pool(self, state: str, *, page: int = 500) -> list[SelectedCase]:
        out: list[SelectedCase] = []
        offset = 0
        while True:
            got = self.pool(state, limit=page, offset=offset)
            out += got.cases
            offset += len(got.cases)
            if not got.cases or offset >= got.total:
                return out

    def get_case(self, case_id: str) -> SelectedCase:
        return SelectedCase.from_dict(self._json("GET", f"/v1/cases/{case_id}"))

    def release(self, case_id: str) -> Release:
        return Release.from_dict(self._json("POST", f"/v1/cases/{case_id}/release"))

    def post_label(self, post: LabelPost) -> LabelReceipt:
        """Create, update or delete one annotation's answer; the hub is idempotent on its annotation id and
        answers with its verdicts on every answer of the case."""
        return LabelReceipt.from_dict(self._json("POST", "/v1/labels", content=post.to_json(), headers=_JSON))

    def events(self, *, after: int | None, limit: int = 500) -> list[StoredEvent]:
        params: dict[str, Any] = {"limit": limit}
        if after is not None:
            params["after"] = after
        return EventPage.from_dict(self._json("GET", "/v1/labeling/events", params=params)).events

    def ack(self, up_to: int) -> None:
        self._json("POST", "/v1/labeling/events/ack", content=Ack(up_to).to_json(), headers=_JSON)

    def labels(self, *, case_id: str | None = None, limit: int = 10000, offset: int = 0) -> list[LabelPublic]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if case_id is not None:
            params["case_id"] = case_id
        return LabelPage.from_dict(self._json("GET", "/v1/labels", params=params)).labels

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

    def _send(self, method: str, path: str, *, headers: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
        try:
            r = self.http.request(method, self.url + path, headers={**self.headers, **(headers or {})},
                                  timeout=self.timeout_s, **kwargs)
        except httpx.TransportError as exc:
            raise TransportError(f"hub {method} {path}: {type(exc).__name__}: {exc}") from exc
        err = error_for_response(r, f"hub {method} {path}")
        if err is not None:
            raise err
        return r


