"""Turn a kept frame into a spooled case: encode the PNG, hash it, complete and validate the Case, store it.

Runs on the decider thread (see ``fleet.edge.decider``), off the inference path. A frame not yet
spooled at a power cut is lost like any frame not yet seen; one in the spool is not.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from numpy.typing import NDArray

from fleet.edge.sources import encode_png
from fleet.edge.spool import Spool
from fleet.errors import FlywheelError
from fleet.protocol import Case

log = logging.getLogger(__name__)


def new_case_id() -> str:
    """A client-generated case id (the upload's idempotency key)."""
    return uuid.uuid4().hex


@dataclass
class Capture:
    """A kept frame: its pixels and every Case field except the image hash and size."""

    image: NDArray[Any]
    fields: dict[str, Any]  # Case fields: case_id, device_id, captured_at, model_version, ...


@dataclass
class RecorderStats:
    stored: int = 0
    not_stored: int = 0  # the spool dropped the newcomer (ranked lowest with the spool full)
    invalid: int = 0
    errors: int = 0


class Recorder:
    def __init__(self, spool: Spool, *, on_stored: Callable[[], None] = lambda: None) -> None:
        self.spool = spool
        self.on_stored = on_stored
        self.stats = RecorderStats()

    def record(self, capture: Capture) -> bool:
        """Encode, validate and spool one capture; True if it was stored."""
        png = encode_png(capture.image)
        case = Case(image_sha256=hashlib.sha256(png).hexdigest(), image_size=len(png), **capture.fields)
        try:
            case.validate()
            text = case.to_json()
        except FlywheelError as exc:
            self.stats.invalid += 1
            log.error("recorder: case %s is not valid, not spooled: %s", case.case_id, exc)
            return False
        result = self.spool.put(case.case_id, case.priority, text, png)
        if result.evicted:
            log.debug("spool full: evicted %d lower-priority case(s) for %s", len(result.evicted), case.case_id)
        if not result.stored:
            self.stats.not_stored += not result.duplicate
            return False
        self.stats.stored += 1
        self.on_stored()
        return True
