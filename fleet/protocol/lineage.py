"""Lineage messages: what a model version was trained on, and which versions a case's label influenced.

A model's manifest names its training data (``data_snapshot``: a hub snapshot id, or ``hub-snapshot:<id>``
as the trainer writes it); a snapshot's manifest lists the labeled cases it froze. The hub joins the two.

==============================================  ================================================================
``GET  /v1/models/{version}/lineage``           -> :class:`ModelLineage`
``GET  /v1/cases/{case_id}/influence``          -> :class:`CaseInfluence`
==============================================  ================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from fleet.errors import ProtocolError
from fleet.protocol.base import (
    SCHEMA_VERSION,
    Message,
    check_int,
    check_name,
    check_names_list,
    check_str,
    opt,
)
from fleet.protocol.dataset import SnapshotPublic
from fleet.protocol.labeling import LABEL_STATUSES
from fleet.protocol.tasks import Prediction, TaskMessage

MAX_LINEAGE = 1_000_000  # entries of one snapshot


@dataclass
class LineageEntry(TaskMessage):
    """One labeled case a snapshot froze: the device that sent it, the label trained on, who labeled it."""

    VERSIONED: ClassVar[bool] = False
    TASK_FIELDS: ClassVar[tuple[str, ...]] = ("label",)

    case_id: str
    device_id: str
    label: Prediction
    status: str  # accepted | gold
    annotators: list[str] = field(default_factory=list)  # whose answers on the case the hub holds now

    def validate(self) -> None:
        check_name(self.case_id, "case_id")
        check_name(self.device_id, "device_id")
        self.label.validate()
        if self.status not in LABEL_STATUSES or self.status == "held":
            raise ProtocolError(f"status must be accepted or gold; received {self.status!r:.40}")
        _check_annotators(self.annotators, 1000)


@dataclass
class DeviceContribution(Message):
    """How many of a snapshot's labeled cases came from one device."""

    VERSIONED: ClassVar[bool] = False

    device_id: str
    cases: int

    def validate(self) -> None:
        check_name(self.device_id, "device_id")
        check_int(self.cases, "cases", lo=0)


@dataclass
class ModelLineage(Message):
    """A model version, its parent, and the data it was trained on: the snapshot (None when its manifest names
    data the hub does not hold, as ``data_snapshot`` then says), every entry, and the devices they came from."""

    PARTS: ClassVar[dict[str, type[Message] | str]] = {"snapshot": SnapshotPublic}
    LISTS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {
        "entries": (LineageEntry, MAX_LINEAGE), "devices": (DeviceContribution, MAX_LINEAGE)}

    version: str
    parent_version: str | None = None
    data_snapshot: str | None = None  # as the manifest names it
    snapshot: SnapshotPublic | None = None
    entries: list[LineageEntry] = field(default_factory=list)
    devices: list[DeviceContribution] = field(default_factory=list)
    annotators: list[str] = field(default_factory=list)
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.version, "version")
        opt(self.parent_version, check_name, "parent_version")
        opt(self.data_snapshot, check_str, "data_snapshot", max_len=128)
        _check_annotators(self.annotators, MAX_LINEAGE)


@dataclass
class CaseInfluence(Message):
    """The model versions a case's label went into: those trained on a snapshot that froze it (oldest first),
    and those snapshots."""

    case_id: str
    versions: list[str] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.case_id, "case_id")
        check_names_list(self.versions, "versions", max_len=100_000, name_check=True)
        check_names_list(self.snapshots, "snapshots", max_len=100_000)


def _check_annotators(value: object, most: int) -> None:
    if not isinstance(value, list) or len(value) > most:
        raise ProtocolError(f"annotators must be a list of at most {most} names; received {value!r:.80}")
    for i, name in enumerate(value):
        check_str(name, f"annotators[{i}]", max_len=256)  # as fleet.protocol.LabelPost allows
