"""The bridge wired together: Label Studio, the hub, the ledger and the settings; ``sync_once`` turns it once.

Orchestration only: what each step does lives in :mod:`labeling.push`, :mod:`labeling.pull` and
the hub, which decides every label's status (:mod:`fleet.consensus`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from fleet.errors import FlywheelError, InvalidInput, RetryableError
from labeling import pull
from labeling import push as pushing
from labeling.config import BridgeConfig, SyncReport
from labeling.hub_client import HubClient
from labeling.ledger import Ledger
from labeling.projects import Project, ProjectSettings, ProjectUpdateRefused
from labeling.records import WEBHOOK_ACTIONS

if TYPE_CHECKING:
    from labeling.studio import Studio

log = logging.getLogger(__name__)

class Bridge:
    """One Label Studio project kept in step with the hub."""

    def __init__(self, studio: Studio, hub: HubClient, ledger: Ledger, config: BridgeConfig, *,
                 clock: Any = time.time) -> None:
        self.studio = studio
        self.hub = hub
        self.ledger = ledger
        self.config = config
        self.clock = clock
        self.kind = config.label_kind
        self._project: Project | None = None
        self._webhook_ready = False
        self._last_reconcile = 0.0
        self.push_timing: dict[str, float] = {}
        self.problems: list[str] = []

    # -----------------------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        names = self.ledger.get("class_names") or list(self.config.class_names)
        if not names:
            raise InvalidInput("the bridge does not know the model's class names yet: pass class_names or push a "
                               "selection first")
        return list(names)

    @property
    def project_id(self) -> int:
        return self.project().id

    def project(self, class_names: list[str] | None = None) -> Project:
        """The Label Studio project, ensured once per process and again when the classes change.

        A project update Label Studio refuses (a 4xx) is reported in :attr:`problems` and the project is
        used as it is: a refused settings change must not stop tasks reaching annotators.
        """
        known = self.ledger.get("class_names")
        names = class_names or known or list(self.config.class_names)
        if not names:
            raise InvalidInput("the bridge does not know the model's class names yet: pass --classes or push a "
                               "selection first")
        if self._project is not None and names == known:
            return self._project
        if known and names[: len(known)] != known:
            raise InvalidInput(f"the model's classes {names} do not extend the classes already labeled {known}; "
                               f"start a new project (--project) for a model with different classes")
        settings = ProjectSettings(
            title=self.config.project_title,
            label_config=self.kind.config(names, instructions=self.config.label_instructions),
            model_version=self.config.queue_version, overlap=self.config.overlap,
            overlap_share=self.config.overlap_share, instructions=self.config.label_instructions,
        )
        try:
            self._project = self.studio.ensure_project(settings)
        except ProjectUpdateRefused as exc:
            self.problem(str(exc))
            self._project = exc.project
            names = self._project.class_names or names
        self.ledger.put("class_names", names)
        self.ledger.put("project_id", self._project.id)
        self.ensure_webhook()
        return self._project

    def refresh_project(self) -> Project:
        """Read the project again from Label Studio (after the bridge changed it)."""
        self._project = self.studio.get_project(self.project_id)
        return self._project

    def problem(self, text: str) -> None:
        """A fault that did not stop the turn (a refused project update, refused tasks): logged as an error and
        reported in the turn's :class:`SyncReport`."""
        log.error("%s", text)
        self.problems.append(text)

    def ensure_webhook(self) -> None:
        if self._webhook_ready or not self.config.webhook_url or self._project is None:
            return
        self.studio.ensure_webhook(self._project.id, self.config.webhook_url, secret=self.config.webhook_secret or "",
                                   actions=WEBHOOK_ACTIONS)
        self._webhook_ready = True

    # -----------------------------------------------------------------------------------------

    def sync_once(self, *, push: bool = True, reconcile: bool | None = None) -> SyncReport:
        """One turn: webhooks, reconciliation (when due), labels to the hub, releases, a throttled push, and
        fresh signed image links for tasks whose link is about to expire.

        A step that fails with a retryable fault is reported and the turn goes on; the next turn
        picks up where it stopped (nothing is lost: the ledger and the hub inbox hold the state).
        """
        report = SyncReport()
        now = self.clock()
        due = reconcile if reconcile is not None else now - self._last_reconcile >= self.config.reconcile_every_s

        def step(name: str, fn: Any) -> None:
            try:
                fn()
            except RetryableError as exc:
                log.warning("sync step %s: %s (will retry next turn)", name, exc)
                report.errors.append(f"{name}: {exc}")
            except FlywheelError as exc:
                log.error("sync step %s failed: %s", name, exc)
                report.errors.append(f"{name}: {exc}")

        if self.ledger.get("class_names") or self.config.class_names:
            step("project", self.project)
        if self._project is not None:
            step("webhooks", lambda: setattr(report, "webhook_events", pull.drain_webhooks(self)))
            if due:
                def rec() -> None:
                    report.reconciled_tasks = pull.reconcile(self)
                    self._last_reconcile = now
                step("reconcile", rec)
            step("flush", lambda: _add(report, pull.flush(self)))
        if push:
            step("push", lambda: setattr(report, "pushed", pushing.push_once(self)))
            if self._project is not None:
                step("flush", lambda: _add(report, pull.flush(self)))
        if self._project is not None:
            step("images", lambda: setattr(report, "images_refreshed", pushing.refresh_images(self)))
        report.errors += self.problems
        self.problems = []
        return report


def _add(report: SyncReport, flushed: dict[str, int]) -> None:
    report.labels_posted += flushed.get("posted", 0)
    report.labels_deleted += flushed.get("deleted", 0)
    report.released += flushed.get("released", 0)
