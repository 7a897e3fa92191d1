"""The trainer's own faults, as leaves of the fleet's exception tree (fleet.errors)."""

from __future__ import annotations

from fleet.errors import IntegrityError, PermanentError


class SnapshotError(IntegrityError):
    """A hub snapshot that cannot be trusted: a blob is missing, corrupt, or the manifest does not verify."""


class ParityError(IntegrityError):
    """The exported ONNX model does not compute what the torch model computes; nothing is published."""


class TrackingError(PermanentError):
    """The experiment-tracking store (``--tracking-uri``) cannot be used; raised before a turn trains anything."""
