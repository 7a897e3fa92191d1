"""Labeling messages: what the hub selects for annotators (:class:`SelectedCase`), and the labels that come
back (:class:`LabelPost`), whoever gives them (the Label Studio bridge, the demo's oracle, a script).

The hub is the source of truth for labels from any source: a client posts each annotator's answer as
it is, and the hub decides its status (``fleet.consensus``) and answers with the verdicts of every
label of the case (:class:`LabelReceipt`).

==========================================  ======================================================
``POST /v1/selections``                     :class:`SelectionRequest` -> :class:`Selection`
``GET  /v1/pool?state=&limit=&offset=``     -> :class:`PoolPage`
``GET  /v1/cases/{case_id}``                -> :class:`SelectedCase`
``POST /v1/cases/{case_id}/release``        -> :class:`Release`
``POST /v1/labels``                         :class:`LabelPost` -> :class:`LabelReceipt`
``GET  /v1/labels?case_id=&limit=&offset=`` -> :class:`LabelPage`
``GET  /v1/labeling/events?after=&limit=``  -> :class:`EventPage` (Label Studio's webhooks, stored)
``POST /v1/labeling/events/ack``            :class:`Ack`
==========================================  ======================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fleet.errors import ProtocolError
from fleet.protocol.base import (
    DB_INT,
    MAX_TAG_NAME,
    SCHEMA_VERSION,
    Message,
    check_bool,
    check_finite,
    check_fraction,
    check_int,
    check_name,
    check_one_of,
    check_str,
    opt,
)
from fleet.protocol.device import Case
from fleet.protocol.tasks import Classification, Prediction, TaskMessage

CASE_STATES = ("unlabeled", "queued", "labeled", "held", "duplicate")
LABEL_STATUSES = ("accepted", "held", "gold")
STRATEGIES = ("random", "uncertainty", "uncertainty+random", "uncertainty+diversity", "uncertainty+kcenter",
              "typiclust", "adaptive", "badge", "entropy")


BALANCE_RE = re.compile(rf"^[A-Za-z0-9_.-]{{1,{MAX_TAG_NAME}}}$")


def check_balance(value: Any, what: str = "balance") -> str:
    """A tag name a selection is balanced over (:class:`SelectionRequest`): 1-64 letters, digits, '_', '.' or '-'
    (the hub reads it with the database's JSON operators; SQLite's JSON path cannot hold a quote)."""
    if not isinstance(value, str) or not BALANCE_RE.match(value):
        raise ProtocolError(f"{what} must be a tag name of 1-{MAX_TAG_NAME} letters, digits, '_', '.' or '-' (as in "
                            f"a case's tags, e.g. 'condition'); received {value!r:.80}")
    return value


@dataclass
class SelectionRequest(Message):
    """Pick up to ``budget`` informative, non-redundant cases; they move to ``queued``."""

    budget: int
    strategy: str = "uncertainty+diversity"
    exclude_queued: bool = True
    # seeds the hub's generator: the same pool (the same images, whatever their case ids) gives the same picks,
    # for every strategy; None: drawn from the operating system
    seed: int | None = None
    # a tag name (a case's ``tags``, e.g. "condition"): the budget is split evenly over the tag's values in the
    # pool, and the strategy picks within each (fleet.hub.selection.pick_balanced); None: over the whole pool
    balance: str | None = None
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_int(self.budget, "budget", lo=1, hi=1_000_000)
        check_one_of(self.strategy, STRATEGIES, "strategy")
        check_bool(self.exclude_queued, "exclude_queued")
        opt(self.seed, check_int, "seed", lo=0, hi=2**63 - 1)
        opt(self.balance, check_balance, "balance")


@dataclass
class SelectedCase(TaskMessage):
    """A case as the labeling side sees it: the device's :class:`Case` (without its embedding, which the hub
    keeps), the link an annotator's browser loads its image from, and what the hub knows of it."""

    TASK_FIELDS: ClassVar[tuple[str, ...]] = ("label",)
    PARTS: ClassVar[dict[str, type[Message] | str]] = {"case": "Case"}

    case: Case
    image_url: str
    class_names: list[str]
    state: str
    score: float  # the labeling queue's order: 1 - informativeness, most informative first (lowest)
    uncertainty: float
    received_at: float
    cluster: int = 0
    duplicate_of: str | None = None
    selection_id: str | None = None
    label: Prediction | None = None  # the consensus of accepted and gold labels
    label_status: str | None = None
    schema: int = SCHEMA_VERSION

    @property
    def case_id(self) -> str:
        return self.case.case_id

    @property
    def model_version(self) -> str:
        return self.case.model_version

    @property
    def predicted_name(self) -> str:
        """The class the model predicted, by name (``classify`` only)."""
        pred = self.case.prediction
        if not isinstance(pred, Classification):
            raise ProtocolError(f"case {self.case_id} is a {pred.task!r} case; it has no single predicted class")
        return self.class_names[pred.label]

    def validate(self) -> None:
        self.case.validate()
        check_str(self.image_url, "image_url", max_len=4096)
        if not self.image_url.startswith(("http://", "https://")):
            raise ProtocolError(f"image_url must be an absolute http(s) URL; received {self.image_url!r:.80}")
        if not isinstance(self.class_names, list) or not self.class_names:
            raise ProtocolError(f"class_names must be a non-empty list; received {self.class_names!r:.80}")
        for n in self.class_names:
            check_str(n, "class name", max_len=128)
        self.case.prediction.check_classes(len(self.class_names), f"case {self.case.case_id}")
        check_one_of(self.state, CASE_STATES, "state")
        check_fraction(self.score, "score")
        check_fraction(self.uncertainty, "uncertainty")
        check_finite(self.received_at, "received_at")
        check_int(self.cluster, "cluster", lo=0, hi=DB_INT)
        opt(self.duplicate_of, check_name, "duplicate_of")
        opt(self.selection_id, check_str, "selection_id", max_len=64)
        if self.label is not None:
            self.label.validate()
        if self.label_status is not None:
            check_one_of(self.label_status, LABEL_STATUSES, "label_status")


@dataclass
class Selection(Message):
    """The hub's answer to a :class:`SelectionRequest`: the picked cases, most informative first."""

    LISTS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {"cases": (SelectedCase, 1_000_000)}

    selection_id: str
    strategy: str
    budget: int
    pool_size: int
    cases: list[SelectedCase]
    # the model whose scores and embeddings the selection used (the active one; None before any is), and the
    # cases of the pool it has not re-scored yet, which fill only what the re-scored pool cannot (fleet.hub.rescore)
    model_version: str | None = None
    not_rescored: int = 0
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_str(self.selection_id, "selection_id", max_len=64)
        check_one_of(self.strategy, STRATEGIES, "strategy")
        check_int(self.budget, "budget", lo=1)
        check_int(self.pool_size, "pool_size", lo=0)
        opt(self.model_version, check_name, "model_version")
        check_int(self.not_rescored, "not_rescored", lo=0)


@dataclass
class PoolPage(Message):
    """One page of the cases in a state, most informative first."""

    LISTS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {"cases": (SelectedCase, 10_000)}

    total: int
    state: str
    cases: list[SelectedCase]
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_int(self.total, "total", lo=0)
        check_one_of(self.state, CASE_STATES, "state")


@dataclass
class Release(Message):
    """A queued case given back to the unlabeled pool (its task was skipped, cancelled or deleted)."""

    case_id: str
    state: str
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.case_id, "case_id")
        check_one_of(self.state, CASE_STATES, "state")


# ---------------------------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------------------------


@dataclass
class LabelPost(TaskMessage):
    """One annotator's answer on one case, as given (idempotent on ``source`` and ``annotation_id``).

    ``overlap``: how many annotators the task waits for; ``ground_truth``: a reviewer's answer marked as
    the truth; ``gold_label``: the known answer when the task is a gold task. ``deleted``: the annotation
    is gone (its label goes too). The hub decides the status; nothing here claims one.
    """

    TASK_FIELDS: ClassVar[tuple[str, ...]] = ("label", "gold_label")

    case_id: str
    label: Prediction
    annotator: str
    task_id: int
    annotation_id: int
    created_at: float
    source: str = "label-studio"
    overlap: int = 1
    ground_truth: bool = False
    gold_label: Prediction | None = None
    deleted: bool = False
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.case_id, "case_id")
        self.label.validate()
        check_str(self.annotator, "annotator", max_len=256)
        if not self.annotator:
            raise ProtocolError("annotator must not be empty")
        check_str(self.source, "source", max_len=64)
        if not self.source:
            raise ProtocolError("source must not be empty")
        check_int(self.task_id, "task_id", lo=0, hi=2**63 - 1)
        check_int(self.annotation_id, "annotation_id", lo=0, hi=2**63 - 1)
        check_finite(self.created_at, "created_at")
        check_int(self.overlap, "overlap", lo=1, hi=100)
        check_bool(self.ground_truth, "ground_truth")
        check_bool(self.deleted, "deleted")
        if self.gold_label is not None:
            self.gold_label.validate()
            if self.gold_label.task != self.label.task:
                raise ProtocolError(f"gold_label is a {self.gold_label.task!r} payload; label is {self.label.task!r}")


@dataclass
class Verdict(Message):
    """The hub's decision on one label: ``accepted`` (trained on), ``held`` (kept for review) or ``gold``."""

    VERSIONED: ClassVar[bool] = False

    annotation_id: int
    source: str
    status: str
    agreement: float | None
    n_annotators: int
    reason: str

    def validate(self) -> None:
        check_int(self.annotation_id, "annotation_id", lo=0, hi=2**63 - 1)
        check_str(self.source, "source", max_len=64)
        check_one_of(self.status, LABEL_STATUSES, "status")
        opt(self.agreement, check_fraction, "agreement")
        check_int(self.n_annotators, "n_annotators", lo=0, hi=DB_INT)
        check_str(self.reason, "reason", max_len=500)


LABEL_ACTIONS = ("created", "updated", "deleted", "unchanged")


@dataclass
class LabelReceipt(Message):
    """What a :class:`LabelPost` did, the case's state after it, and the verdict on every label of the case
    (another annotator's answer can change them)."""

    LISTS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {"verdicts": (Verdict, 1000)}

    action: str
    case_state: str
    label_id: int | None = None
    verdicts: list[Verdict] = field(default_factory=list)
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_one_of(self.action, LABEL_ACTIONS, "action")
        check_one_of(self.case_state, CASE_STATES, "case_state")
        opt(self.label_id, check_int, "label_id", lo=0, hi=2**63 - 1)


@dataclass
class LabelPublic(TaskMessage):
    """A stored label with the hub's verdict on it."""

    TASK_FIELDS: ClassVar[tuple[str, ...]] = ("label",)

    VERSIONED: ClassVar[bool] = False

    id: int
    case_id: str
    label: Prediction
    annotator: str
    source: str
    task_id: int
    annotation_id: int
    created_at: float
    updated_at: float
    status: str
    agreement: float | None
    n_annotators: int
    reason: str = ""

    def validate(self) -> None:
        check_name(self.case_id, "case_id")
        self.label.validate()
        check_one_of(self.status, LABEL_STATUSES, "status")


@dataclass
class LabelPage(Message):
    LISTS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {"labels": (LabelPublic, 10_000)}

    labels: list[LabelPublic]
    schema: int = SCHEMA_VERSION


# ---------------------------------------------------------------------------------------------
# the webhook inbox
# ---------------------------------------------------------------------------------------------


@dataclass
class StoredEvent(Message):
    """A Label Studio webhook body the hub stored (``body`` None, with ``error``, when it cannot be read)."""

    VERSIONED: ClassVar[bool] = False

    id: int
    received_at: float
    body: Any = None
    error: str | None = None


@dataclass
class EventPage(Message):
    LISTS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {"events": (StoredEvent, 10_000)}

    events: list[StoredEvent]
    schema: int = SCHEMA_VERSION


@dataclass
class Ack(Message):
    """The bridge has applied every stored event up to ``up_to``."""

    up_to: int
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_int(self.up_to, "up_to", lo=0, hi=DB_INT)
