"""The hub's HTTP routes, one module per area; ROUTERS is what the app includes."""

from __future__ import annotations

from fleet.hub.routes import (
    campaigns,
    cases,
    devices,
    groups,
    keys,
    labels,
    lineage,
    models,
    observe,
    rollouts,
    shadows,
    snapshots,
)

ROUTERS = [
    observe.router, devices.router, cases.router, labels.router, snapshots.router, models.router,
    rollouts.router, campaigns.router, lineage.router, keys.router, shadows.router,
    groups.router,
]
