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
from fleet.errors import ProtocolError
from fleet.inference.runtime import ModelRuntime
from fleet.signing import generate_keypair, load_private_key, sign_manifest, sign_rotation
from tests.edge.conftest import DEVICE, Keys, assign, client, publish
from tests.support.faults import replaced
from tests.support.inproc import InProcHub
from tests.support.models import ModelFiles

ROOT = Path(__file__).resolve().parents[2]


def manager(tmp_path: Path, hub: InProcHub, keys: Keys) -> OtaManager:
    return OtaManager(ModelStore(tmp_path / "models", keys.public_b64), client(hub), device_id=DEVICE)


def follow(ota: OtaManager) -> None:
    """One OTA turn: fetch the hub's assignment for this device, follow it, report."""
    ota.apply(ota.client.get_assignment())
    ota.flush_reports()


def outcomes(hub: InProcHub) -> list[tuple[str, str]]:
    return [(r.version, r.outcome) for r in hub.ota_reports()]


def downloads(hub: InProcHub, suffix: str = "/onnx") -> int:
    return sum(r.endswith(suffix) for r in hub.requests())


def edit_assignment(hub: InProcHub, **changes: object) -> None:
    """From now on the device receives the hub's assignment with ``changes`` (a hub answering off the contract,
    or something between the two rewriting it)."""
    def edit(request: httpx.Request, response: httpx.Response) -> httpx.Response:
        body = json.loads(response.content)
        for key, value in changes.items():
            if key == "active_sha":  # only while the hub assigns v2
                if (body.get("active") or {}).get("version") == "v2":
                    body["active"]["onnx_sha256"] = value
            else:
                body[key] = value
        return replaced(response, content=json.dumps(body).encode())

    hub.faults.add("GET", "^/v1/assignment$", "edit", times=None, edit=edit)


def test_installs_then_upgrades_keeping_the_previous(tmp_path: Path, hub: InProcHub, keys: Keys, make_model) -> None:
    v1, v2 = make_model("v1", seed=1), make_model("v2", seed=2, parent="v1")
    publish(hub, v1)
    publish(hub, v2)
    ota = manager(tmp_path, hub, keys)
    assert ota.startup().active is None
    follow(ota)  # no active model in the hub yet: nothing to install
    assert ota.models.versions == (None, None) and hub.ota_reports() == []
    assign(hub, v1)
    follow(ota)
    assert ota.models.versions == ("v1", None)
    assign(hub, v2)
    follow(ota)
    assert ota.models.versions == ("v2", None)
    store = ota.store
    assert store.get("active").version == "v2" and store.get("previous").version == "v1"  # type: ignore[union-attr]
    assert outcomes(hub) == [("v1", "installed"), ("v2", "installed")]
    assert hub.ota_reports()[1].previous_version == "v1"
    follow(ota)  # same assignment again: nothing downloaded
    assert downloads(hub) == 2
    # a restart loads the same active model
    again = manager(tmp_path, hub, keys)
    assert again.startup().versions == ("v2", None)


def refused_case(tmp_path: Path, hub: InProcHub, keys: Keys, make_model, publish_bad) -> str:  # type: ignore[no-untyped-def]
    v1 = make_model("v1", seed=1)
    publish(hub, v1)
    ota = manager(tmp_path, hub, keys)
    ota.startup()
    assign(hub, v1)
    follow(ota)
    running = ota.models.active
    bad = publish_bad()  # registered by the hub as v2 (and whatever goes wrong on its way to the device)
    assign(hub, bad)
    follow(ota)
    assert ota.models.active is running  # the old model keeps running
    assert ota.store.get("active").version == "v1"  # type: ignore[union-attr]
    assert not any(p.name.startswith("v2") for p in ota.store.versions.iterdir())
    assert not list(ota.store.incoming.iterdir())
    report = hub.ota_reports()[-1]
    assert (report.version, report.outcome, report.previous_version) == ("v2", "refused", "v1")
    # the only device of the canary refused it: the hub rolled v2 back and assigns v1 again
    assert hub.models()["v2"].status == "retired"
    follow(ota)  # not fetched again
    assert downloads(hub, "/v2/onnx") <= 1
    assert len(hub.ota_reports()) == 2
    return report.reason


def test_tampered_model_is_refused(tmp_path: Path, hub: InProcHub, keys: Keys, make_model) -> None:
    def bad() -> ModelFiles:
        v2 = make_model("v2", seed=2)
        publish(hub, v2)
        blob = hub.hub.blobs.path(v2.manifest.onnx_sha256)  # the hub's stored bytes rot (or are tampered with)
        onnx = bytearray(blob.read_bytes())
        onnx[-10] ^= 0xFF
        blob.write_bytes(bytes(onnx))
        return v2

    reason = refused_case(tmp_path, hub, keys, make_model, bad)
    assert "sha256" in reason and "expected" in reason


def test_wrong_signature_is_refused(tmp_path: Path, hub: InProcHub, keys: Keys, other_keys: Keys, make_model) -> None:
    def bad() -> ModelFiles:
        v2 = make_model("v2", seed=2)
        publish(hub, v2)  # the hub verified it; on the way to the device its manifest is re-signed by another key
        forged = sign_manifest(v2.manifest, other_keys.private).to_json().encode()
        hub.faults.add("GET", "^/v1/models/v2/manifest$", "edit", times=None,
                       edit=lambda request, response: replaced(response, content=forged))
        return v2

    reason = refused_case(tmp_path, hub, keys, make_model, bad)
    assert "signature" in reason and "does not verify" in reason


def test_the_hub_refuses_a_model_signed_by_another_key(hub: InProcHub, other_keys: Keys, make_model) -> None:
    """What the device checks, the hub checked first: such a model is never in its registry."""
    v2 = make_model("v2", seed=2, private_key=other_keys.private)
    r = hub.client.post("/v1/models", headers=hub.bearer("trainer"), data={"manifest": v2.signed.to_json()},
                        files={"onnx": ("model.onnx", v2.onnx_path.read_bytes(), "application/octet-stream")})
    assert r.status_code == 422 and "signature" in r.text


def test_model_that_fails_to_load_is_refused(tmp_path: Path, hub: InProcHub, keys: Keys, make_model) -> None:
    def bad() -> ModelFiles:
        v2 = make_model("v2", seed=2)
        junk = b"definitely not onnx" * 10
        import hashlib

        m = dataclasses.replace(v2.manifest, onnx_sha256=hashlib.sha256(junk).hexdigest(), onnx_size=len(junk))
        v2.onnx_path.write_bytes(junk)
        files = ModelFiles(onnx_path=v2.onnx_path, manifest=m, signed=sign_manifest(m, keys.private))
        publish(hub, files)  # the hub hashes what it registers; it does not load it
        return files

    assert "does not load in onnxruntime" in refused_case(tmp_path, hub, keys, make_model, bad)


@pytest.mark.parametrize(("poison", "words"), [("nan", "NaN"), ("shape", "embedding shape")])
def test_model_failing_the_health_check_is_refused(tmp_path: Path, hub: InProcHub, keys: Keys, make_model,
                                                  poison: str, words: str) -> None:
    def bad() -> ModelFiles:
        v2 = make_model("v2", seed=2, poison=poison)
        publish(hub, v2)
        return v2

    assert words in refused_case(tmp_path, hub, keys, make_model, bad)


def test_manifest_that_does_not_match_the_assignment_is_refused(tmp_path: Path, hub: InProcHub, keys: Keys,
                                                                make_model) -> None:
    def bad() -> ModelFiles:
        v2 = make_model("v2", seed=2)
        publish(hub, v2)
        edit_assignment(hub, active_sha="ab" * 32)
        return v2

    assert "but the assignment asked for v2" in refused_case(tmp_path, hub, keys, make_model, bad)


def test_network_failure_mid_download_is_retried_not_refused(tmp_path: Path, hub: InProcHub, keys: Keys,
                                                            make_model) -> None:
    v1 = make_model("v1")
    publish(hub, v1)
    ota = manager(tmp_path, hub, keys)
    ota.startup()
    assign(hub, v1)
    rule = hub.faults.add("GET", "/onnx$", "lose", times=None)  # the connection breaks during the download
    follow(ota)
    assert ota.models.active is None and hub.ota_reports() == []
    assert not list(ota.store.incoming.iterdir())
    hub.faults.remove(rule)
    follow(ota)
    assert ota.models.versions == ("v1", None)


def test_reports_wait_for_the_hub(tmp_path: Path, hub: InProcHub, keys: Keys, make_model) -> None:
    v1 = make_model("v1")
    publish(hub, v1)
    ota = manager(tmp_path, hub, keys)
    ota.startup()
    assign(hub, v1)
    ota.apply(ota.client.get_assignment())
    rule = hub.faults.add("POST", "^/v1/ota-reports$", "503", times=None)
    ota.flush_reports()
    assert hub.ota_reports() == [] and len(ota.pending_reports) == 1
    hub.faults.remove(rule)
    ota.flush_reports()
    assert outcomes(hub) == [("v1", "installed")] and ota.pending_reports == []


def test_rollback_and_hub_directed_return(tmp_path: Path, hub: InProcHub, keys: Keys, make_model) -> None:
    v1, v2 = make_model("v1", seed=1), make_model("v2", seed=2)
    publish(hub, v1)
    publish(hub, v2)
    ota = manager(tmp_path, hub, keys)
    ota.startup()
    assign(hub, v1)
    follow(ota)
    assign(hub, v2)
    follow(ota)
    # in service, v2 misbehaves: the device goes back to v1 and does not take v2 again
    assert ota.rollback("NaN logits in 3 consecutive batches")
    ota.flush_reports()
    assert ota.models.versions == ("v1", None)
    last = hub.ota_reports()[-1]
    assert (last.version, last.outcome, last.previous_version) == ("v2", "rolled_back", "v1")
    assert hub.field_metrics("v2")["ota_failures"] == 1  # the hub counted it against v2
    follow(ota)
    assert ota.models.versions == ("v1", None)
    assert not ota.rollback("again")  # nothing left to roll back to


def test_hub_moving_the_device_back_uses_the_kept_previous(tmp_path: Path, hub: InProcHub, keys: Keys,
                                                           make_model) -> None:
    v1, v2 = make_model("v1", seed=1), make_model("v2", seed=2)
    publish(hub, v1)
    publish(hub, v2)
    ota = manager(tmp_path, hub, keys)
    ota.startup()
    for m in (v1, v2, v1):
        assign(hub, m)
        follow(ota)
    assert ota.models.versions == ("v1", None)
    assert ota.store.get("previous").version == "v2"  # type: ignore[union-attr]
    assert downloads(hub, "/v1/onnx") == 1  # v1 came from the previous slot


def test_challenger_is_installed_and_withdrawn(tmp_path: Path, hub: InProcHub, keys: Keys, make_model) -> None:
    v1, v2 = make_model("v1", seed=1), make_model("v2", seed=2)
    publish(hub, v1)
    publish(hub, v2)
    ota = manager(tmp_path, hub, keys)
    ota.startup()
    assign(hub, v1)
    rollout = hub.rollout("v2", [1.0])  # the canary (every device) runs v2, and v1 in shadow
    follow(ota)
    assert ota.models.versions == ("v2", "v1")
    assert manager(tmp_path, hub, keys).startup().versions == ("v2", "v1")
    # the rollout completes: v2 is the fleet's model; nothing is shadowed any more
    hub.advance(rollout)
    follow(ota)
    assert ota.models.versions == ("v2", None)
    assert ota.store.state()["challenger"] is None


def test_assignment_for_another_device_is_refused(tmp_path: Path, hub: InProcHub, keys: Keys, make_model,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    v1 = make_model("v1")
    publish(hub, v1)
    ota = manager(tmp_path, hub, keys)
    ota.startup()
    assign(hub, v1)
    edit_assignment(hub, device_id="someone-else")
    with caplog.at_level(logging.ERROR):
        follow(ota)
    assert ota.models.active is None
    assert "refusing assignment: it is for device 'someone-else'" in caplog.text


@pytest.mark.parametrize(
    "body",
    ['{"device_id": "dev-1", "active": {"version": "v1"}}', "[]", "not json",
     '{"device_id": "dev-1", "active": null, "campaigns": [{"campaign_id": "c", "version": -1, "spec": {}}]}'],
)
def test_malformed_assignment_is_refused_by_the_client(hub: InProcHub, body: str) -> None:
    hub.faults.add("GET", "^/v1/assignment$", "answer", content=body.encode(),
                   headers={"content-type": "application/json"})
    with pytest.raises(ProtocolError):
        client(hub).get_assignment()


def test_startup_falls_back_when_the_active_files_are_damaged(tmp_path: Path, hub: InProcHub, keys: Keys,
                                                              make_model) -> None:
    v1, v2 = make_model("v1", seed=1), make_model("v2", seed=2)
    publish(hub, v1)
    publish(hub, v2)
    ota = manager(tmp_path, hub, keys)
    ota.startup()
    for m in (v1, v2):
        assign(hub, m)
        follow(ota)
    onnx = ota.store.get("active").onnx_path  # type: ignore[union-attr]
    onnx.write_bytes(onnx.read_bytes()[:-5])  # bit rot / a torn write outside our control
    again = manager(tmp_path, hub, keys)
    assert again.startup().versions == ("v1", None)
    again.flush_reports()
    assert hub.ota_reports()[-1].outcome == "rolled_back"
    assert "v2" in hub.ota_reports()[-1].version


@pytest.mark.slow
def test_kill_9_during_ota_swaps_leaves_a_valid_active_model(tmp_path: Path, hub: InProcHub, keys: Keys,
                                                            make_model) -> None:
    versions = [f"v{i}" for i in range(3)]
    for i, version in enumerate(versions):
        publish(hub, make_model(version, seed=i))
    root = tmp_path / "device-models"
    rng = random.Random(7)
    seen_versions = set()
    with hub.serve() as url:  # the child is another process: it downloads the models from the hub on loopback
        for round_ in range(8):
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.edge.crashchild", "ota", str(root), keys.public_b64, url,
                 hub.tokens[DEVICE], ",".join(versions), str(round_)],
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


def test_a_device_follows_a_key_rotation_across_otas_and_a_restart(tmp_path: Path, hub: InProcHub, keys: Keys,
                                                                     make_model) -> None:
    """A new fleet key announced under the pinned one: the device installs models signed by either during the
    overlap, keeps trusting the new key after a restart, and after the overlap refuses the old key's models."""
    now = [time.time()]
    store = ModelStore(tmp_path / "models", keys.public_b64, clock=lambda: now[0])
    ota = OtaManager(store, client(hub), device_id=DEVICE)
    v1 = make_model("v1")
    publish(hub, v1)
    assign(hub, v1)
    follow(ota)
    new = generate_keypair()
    rotation = sign_rotation(keys.private, new.public_b64, old_key_until=now[0] + 3600, issued_at=now[0])
    r = hub.client.post("/v1/keys/rotations", content=rotation.to_json(),
                        headers={**hub.admin, "Content-Type": "application/json"})
    assert r.status_code == 201, r.text

    v2 = make_model("v2", seed=2, private_key=load_private_key(new.private_pem))  # signed by the new key
    publish(hub, v2)
    assign(hub, v2)
    follow(ota)
    assert ota.models.active is not None and ota.models.active.version == "v2"
    assert (store.root / "key_rotations.json").stat().st_mode & 0o777 == 0o600

    restarted = ModelStore(tmp_path / "models", keys.public_b64, clock=lambda: now[0])  # a reboot
    assert restarted.get("active").version == "v2"  # type: ignore[union-attr]
    ota = OtaManager(restarted, client(hub), device_id=DEVICE)
    v3 = make_model("v3", seed=3)  # the old key, within the overlap: still fine
    publish(hub, v3)
    assign(hub, v3)
    follow(ota)
    assert ota.models.active is not None and ota.models.active.version == "v3"

    now[0] += 7200  # the overlap is over on the device's clock
    v4 = make_model("v4", seed=4)
    publish(hub, v4)  # the hub (its own clock still in the overlap) takes it; the device must not
    assign(hub, v4)
    follow(ota)
    report = hub.ota_reports()[-1]
    assert (report.version, report.outcome) == ("v4", "refused") and "rotated out" in report.reason
    assert ota.models.active is not None and ota.models.active.version == "v3"
