"""A Label Studio project as the bridge keeps it: its settings and what Label Studio says it is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fleet.errors import InvalidInput
from labeling.configs import config_classes

UNCERTAINTY_SAMPLING = "Uncertainty sampling"


class ProjectUpdateRefused(InvalidInput):
    """Label Studio refused (4xx) to bring an existing project in line; ``project`` is the project as it is."""

    def __init__(self, message: str, project: Project) -> None:
        super().__init__(message)
        self.project = project


@dataclass(frozen=True)
class Project:
    id: int
    title: str
    label_config: str
    sampling: str | None
    model_version: str | None
    maximum_annotations: int
    overlap_cohort_percentage: int
    show_collab_predictions: bool

    @property
    def class_names(self) -> list[str]:
        return config_classes(self.label_config)


@dataclass(frozen=True)
class ProjectSettings:
    """The project the bridge keeps: its queue order, its overlap and how predictions are shown.

    ``model_version`` is the queue's version: Label Studio's uncertainty sampling serves (and its UI
    pre-annotates with) only the predictions whose ``model_version`` equals the project's, and it refuses
    to point a project at a version no prediction carries yet. So it is set when the project is created
    and never changed by :meth:`Studio.ensure_project`; :meth:`Studio.set_queue_version` changes it on
    purpose, after predictions of the new version exist.
    """

    title: str
    label_config: str
    model_version: str | None = None
    overlap: int = 1
    overlap_share: float = 0.0
    description: str = "Flywheel: the most informative edge cases, first."
    instructions: str | None = None

    def fields(self) -> dict[str, Any]:
        percent = int(round(self.overlap_share * 100)) if self.overlap > 1 else 100
        out: dict[str, Any] = {
            "label_config": self.label_config,
            "sampling": UNCERTAINTY_SAMPLING,
            "maximum_annotations": self.overlap,
            "overlap_cohort_percentage": percent,
            "show_collab_predictions": True,
            "show_skip_button": True,
            "description": self.description,
        }
        if self.model_version:
            out["model_version"] = self.model_version
        if self.instructions:
            out["expert_instruction"] = self.instructions
            out["show_instruction"] = True
        return out


def project_from(d: dict[str, Any]) -> Project:
    """A project from Label Studio's JSON."""
    return Project(
        id=int(d["id"]),
        title=str(d.get("title") or ""),
        label_config=str(d.get("label_config") or ""),
        sampling=d.get("sampling"),
        model_version=d.get("model_version") or None,
        maximum_annotations=int(d.get("maximum_annotations") or 1),
        overlap_cohort_percentage=int(d.get("overlap_cohort_percentage") or 100),
        show_collab_predictions=bool(d.get("show_collab_predictions", True)),
    )
