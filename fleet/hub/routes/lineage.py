"""Lineage over HTTP: what a model version was trained on, and which versions a case's label influenced."""

from __future__ import annotations

from fastapi import APIRouter, Response

from fleet.hub import lineage
from fleet.hub.api import HubDep, ReaderCaller, message_response
from fleet.protocol import CaseInfluence, ModelLineage

router = APIRouter(tags=["lineage"])


@router.get("/v1/models/{version}/lineage", response_model=ModelLineage)
def model_lineage(version: str, _: ReaderCaller, hub: HubDep) -> Response:
    """The version's parent, the snapshot it was trained on, each labeled case in it (device, label, annotators)
    and the devices that contributed; ``snapshot`` is null when the manifest names data the hub does not hold."""
    return message_response(lineage.model_lineage(hub, version))


@router.get("/v1/cases/{case_id}/influence", response_model=CaseInfluence)
def case_influence(case_id: str, _: ReaderCaller, hub: HubDep) -> Response:
    """The model versions trained on a snapshot that froze this case's label, and those snapshots."""
    return message_response(lineage.case_influence(hub, case_id))
