from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fleet.edge.modelstore import ModelStore
from fleet.edge.ota import OtaManager
from fleet.edge.runtime import ModelRuntime
from fleet.errors import ProtocolError
from fleet.protocol import Assignment
from fleet.signing import sign_manifest
from tests.edge.conftest import Keys, publish
from tests.edge.fakehub import FakeHub

ROOT = Path(__file__).resolve().parents[2]


def manager(tmp_path: Path, hub: FakeHub, keys: Keys) -> OtaManager:
    return OtaManager(ModelStore(tmp_path / "models", keys.public_b64), hub.client(), device_id=hub.device_id)


def follow(ota: OtaManager, hub: FakeHub) -> None:
    ota.apply(Assignment.from_dict(hub.assignment))
    ota.flush_reports()


def outcomes(hub: FakeHub) -> list[tuple[str, str]]:
    return [(r.version, r.outcome) for r in hub.ota_reports]


def test_installs_then_upgrades_keeping_the_previous(tmp_path: Path, hub: FakeHub, keys: Keys, make_model) -> None:
    v1, v2 = make_model("v1", seed=1), make_model("v2", seed=2, parent="v1")
    publish(hub, v1)
    publish(hub, v2)
    ota = manager(tmp_path, hub, keys)
    assert ota.startup().active is None
    hub.assign(active=v1.manifest)
    follow(ota, hub)
    assert ota.models.versions == ("v1", None)
    hub.assign(active=v2.manifest)
    follow(ota, hub)
    assert ota.models.versions == ("v2", None)
    store = ota.store
    assert store.get("active").version == "v2" and store.get("previous").version == "v1"  # type: ignore[union-attr]
    assert outcomes(hub) == [("v1", "installed"), ("v2", "installed")]
    assert hub.ota_reports[1].previous_version == "v1"
    follow(ota, hub)  # same assignment again: nothing downloaded
    assert sum(r.endswith("/onnx") for r in hub.requests) == 2
    # a restart loads the same active model
    again = manager(tmp_path, hub, keys)
    assert again.startup().versions == ("v2", None)


def refused_case(tmp_path: Path, hub: FakeHub, keys: Keys, make_model, publish_bad) -> str:  # type: ignore[no-untyped-def]
    v1 = make_model("v1", seed=1)
    publish(hub, v1)
    ota = manager(tmp_path, hub, keys)
    ota.startup()
    hub.assign(active=v1.manifest)
    follow(ota, hub)
    running = ota.models.active
    bad_ref = publish_bad()
    hub.assign(active=bad_ref)
    follow(ota, hub)
    assert ota.models.active is running  # the old model keeps running
    assert ota.store.get("active").version == "v1"  # type: ignore[union-attr]
    assert not any(p.name.startswith("v2") for p in ota.store.versions.iterdir())
    assert not list(ota.store.incoming.iterdir())
    report = hub.ota_reports[-1]
    assert (report.version, report.outcome, report.previous_version) == ("v2", "refused", "v1")
    follow(ota, hub)  # not fetched again
    assert sum(r.endswith("/v2/onnx") for r in hub.requests) <= 1
    assert len(hub.ota_reports) == 2
    return report.reason


def test_tampered_model_is_refused(tmp_path: Path, hub: FakeHub, keys: Keys, make_model) -> None:
    def bad():  # type: ignore[no-untyped-def]
        v2 = make_model("v2", seed=2)
        onnx = bytearray(v2.onnx_path.read_bytes())
        onnx[-10] ^= 0xFF
        hub.publish(v2.signed.to_json(), bytes(onnx))
        return v2.manifest

    reason = refused_case(tmp_path, hub, keys, make_model, bad)
    assert "sha256" in reason and "expected" in reason


def test_wrong_signature_is_refused(tmp_path: Path, hub: FakeHub, keys: Keys, other_keys: Keys, make_model) -> None:
    def bad():  # type: ignore[no-untyped-def]
        v2 = make_model("v2", seed=2, private_key=other_keys.private)
        publish(hub, v2)
        return v2.manifest

    reason = refused_case(tmp_path, hub, keys, make_model, bad)
    assert "signature" in reason and "does not verify" in reason


def test_model_that_fails_to_load_is_refused(tmp_path: Path, hub: FakeHub, keys: Keys, make_model) -> None:
    def bad():  # type: ignore[no-untyped-def]
        v2 = make_model("v2", seed=2)
        junk = b"definitely not onnx" * 10
        import hashlib

        m = dataclasses.replace(v2.manifest, onnx_sha256=hashlib.sha256(junk).hexdigest(), onnx_size=len(junk))
        hub.publish(sign_manifest(m, keys.private).to_json(), junk)
        return m

    assert "does not load in onnxruntime" in refused_case(tmp_path, hub, keys, make_model, bad)


@pytest.mark.parametrize(("poison", "words"), [("nan", "NaN"), ("shape", "embedding shape")])
def test_model_failing_the_health_check_is_refused(tmp_path: Path, hub: FakeHub, keys: Keys, make_model,
                                                  poison: str, words: str) -> None:
    def bad():  # type: ignore[no-untyped-def]
        v2 = make_model("v2", seed=2, poison=poison)
        publish(hub, v2)
        return v2.manifest

    assert words in refused_case(tmp_path, hub, keys, make_model, bad)


def test_manifest_that_does_not_match_the_assignment_is_refused(tmp_path: Path, hub: FakeHub, keys: Keys,
                                                                make_model) -> None:
    def bad():  # type: ignore[no-untyped-def]
        v2 = make_model("v2", seed=2)
        publish(hub, v2)
        return {"version": "v2", "onnx_sha256": "ab" * 32}

    assert "but the assignment asked for v2" in refused_case(tmp_path, hub, keys, make_model, bad)


def test_network_failure_mid_download_is_retried_not_refused(tmp_path: Path, hub: FakeHub, keys: Keys,
                                                            make_model) -> None:
    v1 = make_model("v1")
    publish(hub, v1)
    ota = manager(tmp_path, hub, keys)
    ota.startup()
    hub.assign(active=v1.manifest)
    hub.fail = lambda r: httpx.ReadError("reset", request=r) if r.url.path.endswith("/onnx") else None
    follow(ota, hub)
    assert ota.models.active is None and hub.ota_reports == []
    assert not list(ota.store.incoming.iterdir())
    hub.fail = lambda r: None
    follow(ota, hub)
    assert ota.models.versions == ("v1", None)


def test_reports_wait_for_the_hub(tmp_path: Path, hub: FakeHub, keys: Keys, make_model) -> None:
    v1 = make_model("v1")
    publish(hub, v1)
    ota = manager(tmp_path, hub, keys)
    ota.startup()
    hub.assign(active=v1.manifest)
    ota.apply(Assignment.from_dict(hub.assignment))
    hub.fail = lambda r: 503 if r.url.path == "/v1/ota-reports" else None
    ota.flush_reports()
    assert hub.ota_reports == [] and len(ota.pending_reports) == 1
    hub.fail = lambda r: None
    ota.flush_reports()
    assert outcomes(hub) == [("v1", "installed")] and ota.pending_reports == []


def test_rollback_and_hub_directed_return(tmp_path: Path, hub: FakeHub, keys: Keys, make_model) -> None:
    v1, v2 = make_model("v1", seed=1), make_model("v2", seed=2)
    publish(hub, v1)
    publish(hub, v2)
    ota = manager(tmp_path, hub, keys)
    ota.startup()
    hub.assign(active=v1.manifest)
    follow(ota, hub)
    hub.assign(active=v2.manifest)
    follow(ota, hub)
    # in service, v2 misbehaves: the device goes back to v1 and does not take v2 again
    assert ota.rollback("NaN logits in 3 consecutive batches")
    ota.flush_reports()
    assert ota.models.versions == ("v1", None)
    last = hub.ota_reports[-1]
    assert (last.version, last.outcome, last.previous_version) == ("v2", "rolled_back", "v1")
    follow(ota, hub)
    assert ota.models.versions == ("v1", None)
    assert not ota.rollback("again")  # nothing left to roll back to


def test_hub_moving_the_device_back_uses_the_kept_previous(tmp_path: Path, hub: FakeHub, keys: Keys,
                                                           make_model) -> None:
    v1, v2 = make_model("v1", seed=1), make_model("v2", seed=2)
    publish(hub, v1)
    publish(hub, v2)
    ota = manager(tmp_path, hub, keys)
    ota.startup()
    for m in (v1, v2, v1):
        hub.assign(active=m.manifest)
        follow(ota, hub)
    assert ota.models.versions == ("v1", None)
    assert ota.store.get("previous").version == "v2"  # type: ignore[union-attr]
    assert sum(r.endswith("/v1/onnx") for r in hub.requests) == 1  # v1 came from the previous slot


def test_challenger_is_installed_and_withdrawn(tmp_path: Path, hub: FakeHub, keys: Keys, make_model) -> None:
    v1, v2 = make_model("v1", seed=1), make_model("v2", seed=2)
    publish(hub, v1)
    publish(hub, v2)
    ota = manager(tmp_path, hub, keys)
    ota.startup()
    hub.assign(active=v1.manifest, challenger=v2.manifest)
    follow(ota, hub)
    assert ota.models.versions == ("v1", "v2")
    assert manager(tmp_path, hub, keys).startup().versions == ("v1", "v2")
    # promotion: the challenger becomes active; nothing is shadowed any more
    hub.assign(active=v2.manifest, challenger=v2.manifest)
    follow(ota, hub)
    assert ota.models.versions == ("v2", None)
    assert ota.store.state()["challenger"] is None


def test_assignment_for_another_device_is_refused(tmp_path: Path, hub: FakeHub, keys: Keys, make_model,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    v1 = make_model("v1")
    publish(hub, v1)
    ota = manager(tmp_path, hub, keys)
    ota.startup()
    hub.assign(active=v1.manifest)
    hub.assignment["device_id"] = "someone-else"
    with caplog.at_level(logging.ERROR):
        follow(ota, hub)
    assert ota.models.active is None
    assert "refusing assignment: it is for device 'someone-else'" in caplog.text


@pytest.mark.parametrize(
    "body",
    ['{"device_id": "dev-1", "active": {"version": "v1"}}', "[]", "not json",
     '{"device_id": "dev-1", "active": null, "campaigns": [{"campaign_id": "c", "version": -1, "spec": {}}]}'],
)
def test_malformed_assignment_is_refused_by_the_client(hub: FakeHub, body: str) -> None:
    hub.assignment = body
    with pytest.raises(ProtocolError):
        hub.client().get_assignment()


def test_startup_falls_back_when_the_active_files_are_damaged(tmp_path: Path, hub: FakeHub, keys: Keys,
                                                              make_model) -> None:
    v1, v2 = make_model("v1", seed=1), make_model("v2", seed=2)
    publish(hub, v1)
    publish(hub, v2)
    ota = manager(tmp_path, hub, keys)
    ota.startup()
    for m in (v1, v2):
        hub.assign(active=m.manifest)
        follow(ota, hub)
    onnx = ota.store.get("active").onnx_path  # type: ignore[union-attr]
    onnx.write_bytes(onnx.read_bytes()[:-5])  # bit rot / a torn write outside our control
    again = manager(tmp_path, hub, keys)
    assert again.startup().versions == ("v1", None)
    again.flush_reports()
    assert hub.ota_reports[-1].outcome == "rolled_back"
    assert "v2" in hub.ota_reports[-1].version


@pytest.mark.slow
def test_kill_9_during_ota_swaps_leaves_a_valid_active_model(tmp_path: Path, keys: Keys, make_model) -> None:
    published = tmp_path / "published"
    for i in range(3):
        files = make_model(f"v{i}", seed=i)
        files.onnx_path.with_suffix(".json").write_text(files.signed.to_json())
    root = tmp_path / "device-models"
    rng = random.Random(7)
    seen_versions = set()
    for round_ in range(8):
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.edge.crashchild", "ota", str(root), keys.public_b64, str(published),
             str(round_)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("active"), proc.stderr.read() if proc.stderr else ""
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        # restart: repair, then the active model verifies, loads and passes its health check
        store = ModelStore(root, keys.public_b64)
        state_before = json.loads((root / "state.json").read_text())
        assert state_before["active"] is not None
        store.repair()
        active = store.get("active")
        assert active is not None
        seen_versions.add(active.version)
        ModelRuntime(active.onnx_path, active.manifest)
        for slot in ("previous", "challenger"):
            stored = store.get(slot)
            if stored is not None:
                ModelRuntime(stored.onnx_path, stored.manifest)
        assert not list(store.incoming.iterdir())
        referenced = {v for v in store.state().values() if v}
        assert {p.name for p in store.versions.iterdir()} == referenced
    assert seen_versions  # the child really swapped models under the kills
