"""Dataset messages: a snapshot of the labeled cases, frozen for the trainer.

A snapshot's manifest is JSON lines: a :class:`SnapshotHeader` first (the task, the class names, how many
entries follow), then one :class:`SnapshotEntry` per labeled case. It is stored by its sha256, which the
hub states when it creates the snapshot, so the trainer can refuse a manifest that changed on the way.

==========================================  ======================================================
``POST /v1/snapshots``                      :class:`SnapshotCreate` -> :class:`SnapshotPublic`
``GET  /v1/snapshots``                      -> :class:`SnapshotList`
``GET  /v1/snapshots/{id}/manifest``        -> the manifest (``application/x-ndjson``)
``POST /v1/blobs/bulk``                     :class:`BlobRequest` -> a tar of ``{sha256}.png``
==========================================  ======================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

from fleet.errors import ProtocolError
from fleet.protocol.base import (
    SCHEMA_VERSION,
    Message,
    check_finite,
    check_int,
    check_sha256,
    check_str,
    opt,
)
from fleet.protocol.device import Case
from fleet.protocol.labeling import LABEL_STATUSES
from fleet.protocol.tasks import TASKS, Prediction, TaskMessage


@dataclass
class SnapshotCreate(Message):
    name: str | None = None
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        opt(self.name, check_str, "name", max_len=128)


@dataclass
class SnapshotPublic(Message):
    """A snapshot the hub froze: its id, version, size and the sha256 of its manifest."""

    snapshot_id: str
    version: int
    n_labels: int
    manifest_sha256: str
    created_at: float
    name: str | None = None
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_str(self.snapshot_id, "snapshot_id", max_len=64)
        check_int(self.version, "version", lo=1)
        check_int(self.n_labels, "n_labels", lo=0)
        check_sha256(self.manifest_sha256, "manifest_sha256")
        check_finite(self.created_at, "created_at")


@dataclass
class SnapshotList(Message):
    LISTS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {"snapshots": (SnapshotPublic, 100_000)}

    snapshots: list[SnapshotPublic]
    schema: int = SCHEMA_VERSION


@dataclass
class SnapshotHeader(Message):
    """The manifest's first line: what every entry's label means."""

    snapshot_id: str
    version: int
    task: str
    class_names: list[str]
    n_entries: int
    created_at: float
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_str(self.snapshot_id, "snapshot_id", max_len=64)
        check_int(self.version, "version", lo=1)
        if self.task not in TASKS:
            raise ProtocolError(f"task must be one of {list(TASKS)}; received {self.task!r:.40}")
        if not isinstance(self.class_names, list) or not self.class_names:
            raise ProtocolError(f"class_names must be a non-empty list; received {self.class_names!r:.80}")
        for n in self.class_names:
            check_str(n, "class name", max_len=128)
        check_int(self.n_entries, "n_entries", lo=0)
        check_finite(self.created_at, "created_at")


@dataclass
class SnapshotEntry(TaskMessage):
    """One labeled case: the device's :class:`Case` as uploaded, and the label the hub decided on."""

    TASK_FIELDS: ClassVar[tuple[str, ...]] = ("label",)
    PARTS: ClassVar[dict[str, type[Message] | str]] = {"case": "Case"}

    case: Case
    label: Prediction
    status: str  # accepted | gold
    schema: int = SCHEMA_VERSION

    @property
    def case_id(self) -> str:
        return self.case.case_id

    @property
    def image_sha256(self) -> str:
        return self.case.image_sha256

    def validate(self) -> None:
        self.case.validate()
        self.label.validate()
        if self.status not in LABEL_STATUSES or self.status == "held":
            raise ProtocolError(f"status must be accepted or gold; received {self.status!r:.40}")


@dataclass
class BlobRequest(Message):
    sha256s: list[str]
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        if not isinstance(self.sha256s, list) or len(self.sha256s) > 20_000:
            raise ProtocolError(f"sha256s must be a list of at most 20000 hashes; received {self.sha256s!r:.80}")
        for s in self.sha256s:
            check_sha256(s, "sha256s item")


def encode_manifest(header: SnapshotHeader, entries: list[SnapshotEntry]) -> bytes:
    """The manifest's bytes: the header, then one entry a line (deterministic: sorted keys)."""
    if header.n_entries != len(entries):
        raise ProtocolError(f"the header announces {header.n_entries} entries; {len(entries)} were given")
    lines = [json.dumps(m.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)
             for m in (header, *entries)]
    return ("\n".join(lines) + "\n").encode("utf-8")


def decode_manifest(raw: bytes, *, what: str = "snapshot manifest") -> tuple[SnapshotHeader, list[SnapshotEntry]]:
    """Parse a manifest; a malformed line is refused with its line number, and every label must name a class
    of the header's ``class_names``."""
    try:
        lines = [line for line in raw.decode("utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} is not UTF-8 ({exc})") from None
    if not lines:
        raise ProtocolError(f"{what} is empty; expected a header line")
    try:
        header = SnapshotHeader.from_json(lines[0])
    except ProtocolError as exc:
        raise ProtocolError(f"{what} line 1 (the header): {exc}") from None
    entries = []
    for n, line in enumerate(lines[1:], start=2):
        try:
            entry = SnapshotEntry.from_json(line)
            entry.label.check_classes(len(header.class_names), f"case {entry.case_id}")
            if entry.label.task != header.task:
                raise ProtocolError(f"a {entry.label.task!r} label in a {header.task!r} snapshot")
        except ProtocolError as exc:
            raise ProtocolError(f"{what} line {n}: {exc}; received {line[:200]!r}") from None
        entries.append(entry)
    if len(entries) != header.n_entries:
        raise ProtocolError(f"{what}: the header announces {header.n_entries} entries; {len(entries)} follow")
    return header, entries
