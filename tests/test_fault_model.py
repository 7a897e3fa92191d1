"""Every client reads an answer's status the same way and retries the same faults (fleet.errors, fleet.retry)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from fleet.errors import RETRYABLE_STATUS, error_for_status
from fleet.retry import RetryPolicy

STATUSES = (400, 401, 403, 404, 408, 409, 413, 415, 422, 425, 429, 500, 502, 503)
RETRY = RetryPolicy(attempts=3, base_s=0.0, cap_s=0.0)


class Answering(httpx.BaseTransport):
    """Answers ``status`` ``fail`` times, then 200 with ``ok``."""

    def __init__(self, status: int, fail: int, ok: Any) -> None:
        self.status, self.fail, self.ok, self.calls = status, fail, ok, 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.calls <= self.fail:
            return httpx.Response(self.status, json={"detail": f"injected {self.status}"})
        return httpx.Response(200, json=self.ok)


def labeling_hub(t: Answering) -> Callable[[], Any]:
    from labeling.hub_client import HubClient

    client = HubClient("http://hub", "tok", http=httpx.Client(transport=t), retry=RETRY, sleep=lambda _: None)
    return lambda: client.pool("unlabeled")


def training_hub(t: Answering) -> Callable[[], Any]:
    from training.hub_client import HubClient

    client = HubClient("http://hub", "tok", transport=t, retry=RETRY, sleep=lambda _: None)
    return client.list_models


def label_studio(t: Answering) -> Callable[[], Any]:
    pytest.importorskip("label_studio_sdk")
    from labeling.studio import Studio

    studio = Studio("http://ls", "tok", http=httpx.Client(transport=t), retry=RETRY, sleep=lambda _: None)
    return studio.invite_token


CLIENTS = {"labeling hub client": (labeling_hub, {"total": 0, "state": "unlabeled", "cases": []}),
           "training hub client": (training_hub, {"models": []}),
           "Label Studio client": (label_studio, {"token": "t"})}


@pytest.mark.parametrize("status", STATUSES)
@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_every_client_maps_and_retries_a_status_the_same_way(client: str, status: int) -> None:
    make, ok = CLIENTS[client]
    retryable = status in RETRYABLE_STATUS or status >= 500
    once = Answering(status, fail=1, ok=ok)
    call = make(once)
    if retryable:
        call()  # the fault went away on the second try
        assert once.calls == 2
    else:
        with pytest.raises(type(error_for_status(status, ""))) as err:
            call()
        assert once.calls == 1, "a permanent fault is not retried"
        assert f"injected {status}" in str(err.value)
    always = Answering(status, fail=99, ok=ok)
    with pytest.raises(type(error_for_status(status, ""))):
        make(always)()
    assert always.calls == (RETRY.attempts if retryable else 1)
