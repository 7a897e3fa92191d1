"""Reading the hub's admin answers (models, rollouts, campaigns) in one place: their shapes are being typed
(issue 14), so a test reads them only through these helpers, and a change of shape is one edit here."""

from __future__ import annotations

from typing import Any


def rollout_id(answer: Any) -> str:
    """The id in the answer of POST /v1/rollouts (or of a rollout's status)."""
    return str(answer["rollout_id"])


def rollout_summary(answer: Any) -> dict[str, Any]:
    """What a rollout was started with: ``{"version", "stages", "stage_seconds"}``."""
    return {"version": answer["version"], "stages": list(answer["stages"]), "stage_seconds": answer["stage_seconds"]}


def rollouts(client: Any, headers: dict[str, str]) -> list[dict[str, Any]]:
    """GET /v1/rollouts (trainer scope), newest first."""
    r = client.get("/v1/rollouts", headers=headers)
    assert r.status_code == 200, r.text
    return list(r.json())


def models(client: Any, headers: dict[str, str]) -> dict[str, dict[str, Any]]:
    """GET /v1/models (trainer or labeler scope): version -> its entry (``status`` among it)."""
    r = client.get("/v1/models", headers=headers)
    assert r.status_code == 200, r.text
    return {m["version"]: m for m in r.json()}
