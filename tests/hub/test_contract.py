"""One contract, used by both sides of every seam: a field added to the Case travels from the device through
the hub to the labeling bridge and into the trainer's snapshot, with no other code changed.

The test adds the field the way a contributor would (a new field on fleet.protocol's Case, here in a
subclass) and puts that class in place of ``Case`` wherever a module bound the name. If any seam restated
the case's keys by hand instead of using the type, the field would be dropped there and the test fails.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from fleet.protocol import Case
from tests.hub.conftest import HubHarness


@dataclass
class CaseWithWeather(Case):
    weather: str = "clear"  # the new field


@pytest.fixture
def extended_case(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[Case]]:
    """Every module that bound ``Case`` now holds the extended class (as after the one edit)."""
    import fleet.edge.hubclient  # noqa: F401 - the seams, loaded so that their bindings are found
    import fleet.hub.routes.cases  # noqa: F401
    import fleet.hub.routes.snapshots  # noqa: F401
    import labeling.hub_client  # noqa: F401
    import training.snapshot  # noqa: F401

    bound = [name for name, mod in list(sys.modules.items())
             if name.split(".")[0] in ("fleet", "labeling", "training") and getattr(mod, "Case", None) is Case]
    for name in bound:
        monkeypatch.setattr(sys.modules[name], "Case", CaseWithWeather)
    assert "fleet.protocol.device" in bound and "fleet.hub.ingest" in bound
    yield CaseWithWeather


def test_a_new_case_field_travels_from_the_device_to_the_trainer(hub: HubHarness, extended_case: type[Case],
                                                                 tmp_path: Path) -> None:
    from fleet.edge.hubclient import HubClient as DeviceClient
    from labeling.hub_client import HubClient as LabelingClient
    from training.hub_client import HubClient as TrainerClient
    from training.snapshot import pull_snapshot

    # the device builds and uploads a case carrying the field
    case, image = hub.make_case("d1")
    sent = extended_case(**{**{f.name: getattr(case, f.name) for f in fields(case)}, "weather": "fog"})
    device = DeviceClient(hub.client, token=hub.devices["d1"]["Authorization"].removeprefix("Bearer "))
    assert device.upload_case(sent.to_json(), image).status == "created"

    # the labeling bridge sees it on the case the hub selects
    labeler = LabelingClient("http://hub.test", hub.labeler["Authorization"].removeprefix("Bearer "), http=hub.client)
    [selected] = labeler.select(1, strategy="uncertainty").cases
    assert selected.case.weather == "fog"  # type: ignore[attr-defined]
    assert labeler.get_case(sent.case_id).case.weather == "fog"  # type: ignore[attr-defined]

    # ... labels it, and the trainer's snapshot carries it
    hub.label(sent.case_id, 1)
    trainer = TrainerClient("http://hub.test", hub.trainer["Authorization"].removeprefix("Bearer "),
                            transport=hub.client._transport)
    snap = pull_snapshot(trainer, cache_dir=tmp_path)
    assert [e.case.weather for e in snap.entries] == ["fog"]  # type: ignore[attr-defined]
    assert snap.class_names == ["class_0", "class_1", "class_2"]  # what the labels mean travels too
