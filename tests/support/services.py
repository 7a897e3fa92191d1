"""Real services the integration tests need: absent, a test skips; promised by scripts/test.sh, it fails."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def missing_service(reason: str) -> NoReturn:
    """Skip the test, or fail it when the test command started the services (``FLYWHEEL_TEST_SERVICES=required``,
    set by scripts/test.sh): then a missing service is a broken setup, never a pass."""
    if os.environ.get("FLYWHEEL_TEST_SERVICES") == "required":
        pytest.fail(f"{reason}; scripts/test.sh promised it (FLYWHEEL_TEST_SERVICES=required)", pytrace=False)
    pytest.skip(reason)
