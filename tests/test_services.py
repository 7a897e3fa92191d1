"""The test command's promise: a service it started is required, so a missing one fails a test, never skips it."""

from __future__ import annotations

import pytest

from tests.support.services import missing_service
from tests.system import support


def test_a_missing_service_skips_outside_the_test_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLYWHEEL_TEST_SERVICES", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no server"):
        missing_service("no server")


def test_a_missing_service_fails_under_the_test_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_TEST_SERVICES", "required")
    with pytest.raises(pytest.fail.Exception, match="promised it"):
        missing_service("no server")


def test_system_tests_fail_without_postgresql_under_the_test_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(support, "PG_URL", None)
    monkeypatch.setenv("FLYWHEEL_TEST_SERVICES", "required")
    with pytest.raises(pytest.fail.Exception, match="FLYWHEEL_TEST_PG_URL"), support.fresh_pg_database():
        pass
    monkeypatch.delenv("FLYWHEEL_TEST_SERVICES")
    with support.fresh_pg_database() as url:  # a developer's run without the services: SQLite instead
        assert url is None
