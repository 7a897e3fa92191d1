"""One fault model: HTTP statuses map onto the exception tree in one place, and back."""

from __future__ import annotations

import email.utils

import httpx
import pytest

from fleet.errors import (
    Conflict,
    FlywheelError,
    Forbidden,
    IntegrityError,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    PermanentError,
    ProtocolError,
    RequestTimeout,
    RetryableError,
    ServerBusy,
    TooManyRequests,
    TransportError,
    Unauthorized,
    UnsupportedMedia,
    error_for_response,
    error_for_status,
    headers_for,
    parse_retry_after,
    status_for,
)

EXPECTED = {
    400: InvalidInput, 401: Unauthorized, 403: Forbidden, 404: NotFound, 405: InvalidInput, 408: RequestTimeout,
    409: Conflict, 413: PayloadTooLarge, 415: UnsupportedMedia, 422: InvalidInput, 425: ServerBusy,
    429: TooManyRequests, 500: ServerBusy, 502: ServerBusy, 503: ServerBusy, 504: ServerBusy,
}


@pytest.mark.parametrize(("status", "kind"), sorted(EXPECTED.items()))
def test_each_status_maps_onto_one_kind(status: int, kind: type[FlywheelError]) -> None:
    err = error_for_status(status, f"GET /x: HTTP {status}")
    assert type(err) is kind and str(err) == f"GET /x: HTTP {status}"
    assert isinstance(err, RetryableError) == (status in (408, 425, 429) or status >= 500)


@pytest.mark.parametrize("exc", [Forbidden("f"), Unauthorized("u"), NotFound("n"), Conflict("c"),
                                 PayloadTooLarge("p"), UnsupportedMedia("m"), InvalidInput("i"),
                                 TooManyRequests("t", retry_after=1.0), RequestTimeout("r")])
def test_the_hubs_status_for_a_fault_maps_back_onto_the_same_fault(exc: FlywheelError) -> None:
    assert type(error_for_status(status_for(exc), "x")) is type(exc)


def test_statuses_of_faults_without_a_status_of_their_own() -> None:
    assert status_for(ProtocolError("p")) == status_for(IntegrityError("i")) == 422
    assert status_for(ServerBusy("b")) == status_for(TransportError("t")) == 503
    assert status_for(PermanentError("p")) == 400 and status_for(FlywheelError("f")) == 500


def test_a_response_carries_the_peers_detail_and_retry_after() -> None:
    r = httpx.Response(429, json={"detail": "fleet upload cap reached"}, headers={"Retry-After": "7"})
    err = error_for_response(r, "POST /v1/cases")
    assert isinstance(err, TooManyRequests) and err.retry_after == 7.0
    assert str(err) == "POST /v1/cases: HTTP 429: fleet upload cap reached"
    ls = httpx.Response(400, json={"detail": "Validation error", "validation_errors": {"model_version": ["no"]}})
    assert "Validation error {'model_version': ['no']}" in str(error_for_response(ls, "PATCH"))
    assert "<html>oops" in str(error_for_response(httpx.Response(502, text="<html>oops"), "GET"))
    assert error_for_response(httpx.Response(204), "GET") is None


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert parse_retry_after("120") == 120.0 and parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("-3") == 0.0
    when = email.utils.formatdate(1_000_030.0, usegmt=True)
    assert parse_retry_after(when, now=1_000_000.0) == pytest.approx(30.0)
    for junk in (None, "", "soon", "nan", "inf"):
        assert parse_retry_after(junk) is None


def test_the_hub_says_when_to_retry_and_how_to_authenticate() -> None:
    assert headers_for(TooManyRequests("t", retry_after=0.2)) == {"Retry-After": "1"}  # whole seconds, at least 1
    assert headers_for(ServerBusy("b", retry_after=2.5)) == {"Retry-After": "3"}
    assert headers_for(Unauthorized("u")) == {"WWW-Authenticate": "Bearer"}
    assert headers_for(Forbidden("f")) == headers_for(NotFound("n")) == {}
