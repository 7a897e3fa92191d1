"""What the push and pull steps need of a bridge, so that they depend on this and not on the bridge itself.

:class:`labeling.bridge.Bridge` is the one implementation; the steps import this module, the bridge imports
the steps, and no import runs back up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from labeling.config import BridgeConfig
    from labeling.configs import LabelKind
    from labeling.hub_client import HubClient
    from labeling.ledger import Ledger
    from labeling.projects import Project
    from labeling.studio import Studio


class BridgeContext(Protocol):
    studio: Studio
    hub: HubClient
    ledger: Ledger
    config: BridgeConfig
    clock: Callable[[], float]
    kind: LabelKind
    push_timing: dict[str, float]

    @property
    def project_id(self) -> int: ...

    @property
    def class_names(self) -> list[str]: ...

    def project(self, class_names: list[str] | None = None) -> Project: ...

    def refresh_project(self) -> Project: ...

    def problem(self, text: str) -> None: ...
