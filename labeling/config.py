"""The bridge's settings and the report of one sync turn (typed, built by the caller, never at import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fleet.errors import InvalidInput, ProtocolError
from fleet.protocol import STRATEGIES, check_balance, check_int
from labeling.configs import LabelKind, check_class_names, get_kind, kind_for_task
from labeling.throttle import Throttle

# The ``model_version`` of every prediction the bridge pushes, and of the project: one queue across model
# versions. Label Studio 1.23's uncertainty sampling (projects/functions/next_task.py) serves, and its UI
# pre-annotates with, only predictions whose model_version equals the project's; and it refuses to point
# a project at a version no prediction carries yet. Per-model versions would therefore need a project
# update after every retrain, and during a canary (two versions uploading at once) would split the queue.
# The model that made each prediction is kept in the task's data (``model_version``).
QUEUE_VERSION = "flywheel"


@dataclass(frozen=True)
class BridgeConfig:
    """Everything that shapes the queue and the quality rules (typed, built by the caller, never at import)."""

    project_title: str = "Flywheel"
    task: str = "classify"  # the contract's task of the cases this project labels; it picks the labeling kind
    kind: str = ""  # a labeling kind by name (labeling.configs.KINDS); empty: the task's kind
    class_names: tuple[str, ...] = ()
    overlap: int = 2
    overlap_share: float = 0.2
    throttle: Throttle = field(default_factory=Throttle)
    strategy: str = "uncertainty+diversity"
    balance: str | None = None  # a case tag: the hub splits each selection evenly over its values
    selection_seed: int | None = None  # seeds each of the hub's selections (the same pool, the same picks)
    batch_size: int = 500
    reconcile_every_s: float = 60.0
    webhook_url: str | None = None
    webhook_secret: str | None = None
    image_refresh_margin_s: float = 3600.0
    in_doubt_grace_s: float = 2.0
    instructions: str | None = ""  # shown above the image; empty: the kind's own words; None: none
    queue_version: str = QUEUE_VERSION
    # seconds a turn spends setting predictions' diversity clusters, one request each (labeling.push); the
    # queue is already in round-robin order over the clusters without them
    cluster_budget_s: float = 10.0

    def __post_init__(self) -> None:
        by_task = kind_for_task(self.task)
        if self.kind and get_kind(self.kind).task != self.task:
            raise InvalidInput(f"labeling kind {self.kind!r} labels {get_kind(self.kind).task!r} cases; the project's "
                               f"task is {self.task!r} (its kind is {by_task.name!r})")
        if not self.queue_version or len(self.queue_version) > 64 or not self.queue_version.isprintable():
            raise InvalidInput(f"queue_version must be 1-64 printable characters; received {self.queue_version!r}")
        if self.class_names:
            check_class_names(self.class_names)
        if not 1 <= self.overlap <= 20:
            raise InvalidInput(f"overlap must be between 1 and 20 annotators; received {self.overlap}")
        if not 0.0 <= self.overlap_share <= 1.0:
            raise InvalidInput(f"overlap_share must lie in [0, 1]; received {self.overlap_share}")
        if self.strategy not in STRATEGIES:
            raise InvalidInput(f"unknown selection strategy {self.strategy!r}; valid: {list(STRATEGIES)}")
        try:
            if self.balance is not None:
                check_balance(self.balance)
            if self.selection_seed is not None:
                check_int(self.selection_seed, "selection_seed", lo=0, hi=2**63 - 1)
        except ProtocolError as exc:
            raise InvalidInput(str(exc)) from None
        if not 1 <= self.batch_size <= 5000:
            raise InvalidInput(f"batch_size must be between 1 and 5000; received {self.batch_size}")
        if not self.cluster_budget_s >= 0.0:  # (NaN fails too)
            raise InvalidInput(f"cluster_budget_s must be >= 0 seconds; received {self.cluster_budget_s}")
        if self.webhook_url and not self.webhook_secret:
            raise InvalidInput("a webhook URL needs a webhook secret (the hub checks X-Flywheel-Webhook-Secret)")

    @property
    def label_kind(self) -> LabelKind:
        """The labeling kind: the one named, else the task's."""
        return get_kind(self.kind) if self.kind else kind_for_task(self.task)

    @property
    def label_instructions(self) -> str | None:
        """What annotators read above the image."""
        return self.label_kind.instructions if self.instructions == "" else self.instructions

    @property
    def expected_overlap(self) -> float:
        return 1.0 + self.overlap_share * (self.overlap - 1) if self.overlap > 1 else 1.0


@dataclass
class SyncReport:
    webhook_events: int = 0
    reconciled_tasks: int | None = None
    labels_posted: int = 0
    labels_deleted: int = 0
    released: int = 0
    pushed: int = 0
    images_refreshed: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)
