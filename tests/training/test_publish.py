"""Publishing: what reaches the hub, and the faults after which nothing does."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from fleet.errors import InvalidInput
from fleet.protocol import SignedManifest
from fleet.signing import verify_manifest
from tests.support.data import digits_arrays, png_bytes
from tests.support.inproc import InProcHub
from training import export as export_mod
from training.bank import BANK_FILE, MAX_BANK_SIZE
from training.config import TrainArgs
from training.errors import ParityError, SnapshotError
from training.hub_client import HubClient
from training.publish import parse_stages
from training.train import main
from trigger import NoveltyBank

from .conftest import add_case, trainer

MakeArgs = Callable[..., TrainArgs]


def factory_for(hub: InProcHub) -> Callable[[str], HubClient]:
    return lambda url: trainer(hub, url)


def posted(hub: InProcHub, path: str) -> int:
    return hub.faults.count("POST", f"^{path}$")


def test_a_passing_candidate_is_uploaded_signed_and_rolled_out(
    make_args: MakeArgs, signing_key: tuple[Path, str], hub: InProcHub
) -> None:
    report = main(make_args(publish="http://hub", sign_key=str(signing_key[0]), version="v7",
                            rollout_stages=[0.25, 1.0], stage_seconds=5.0), client_factory=factory_for(hub))
    assert report["status"] == "published" and report["published"]
    [rollout] = hub.rollouts()
    assert posted(hub, "/v1/models") == 1
    assert (rollout.version, rollout.stages, rollout.stage_seconds) == ("v7", [0.25, 1.0], 5.0)
    assert hub.models()["v7"].status == "canary"  # m0 is the incumbent
    r = hub.client.get("/v1/models/v7/manifest", headers=hub.bearer("trainer"))
    manifest = verify_manifest(SignedManifest.from_dict(r.json()), signing_key[1])
    onnx = hub.client.get("/v1/models/v7/onnx", headers=hub.bearer("trainer")).content
    assert manifest.onnx_size == len(onnx)
    assert report["publish"]["rollout"]["rollout_id"] == rollout.rollout_id
    assert "publish" in report["timings"]
    # the model's novelty bank went up before the rollout, built in its own embedding space
    sent = hub.requests()
    assert sent.index("PUT /v1/models/v7/novelty-bank") < sent.index("POST /v1/rollouts")
    r = hub.client.get("/v1/novelty-banks/model-v7", headers=hub.bearer("trainer"))
    assert r.status_code == 200, r.text
    bank = NoveltyBank.from_bytes(r.content)
    assert bank.dim == manifest.embedding_dim and bank.meta["model_version"] == "v7"
    pool = report["data"]["new"]["n"] + (report["data"]["base"] or {"n": 0})["n"]
    assert len(bank) == min(MAX_BANK_SIZE, pool) and report["novelty_bank"].endswith(BANK_FILE)


def test_a_candidate_that_fails_the_gate_never_reaches_the_hub(
    make_args: MakeArgs, trained: Path, signing_key: tuple[Path, str], hub: InProcHub
) -> None:
    report = main(make_args(publish="http://hub", sign_key=str(signing_key[0]), epochs=1, width=4,
                            gate_against=trained / "checkpoint.pt"), client_factory=factory_for(hub))
    assert report["status"] == "rejected" and not report["published"]
    assert hub.requests() == ["GET /v1/rollouts"]  # only the read that checked the hub before training
    assert report["baseline"]["metrics"]["test"]["accuracy"] > report["metrics"]["test"]["accuracy"]


def test_dry_run_talks_to_no_hub(make_args: MakeArgs, signing_key: tuple[Path, str], hub: InProcHub) -> None:
    report = main(make_args(publish="http://hub", sign_key=str(signing_key[0]), dry_run=True, epochs=1),
                  client_factory=factory_for(hub))
    assert report["status"] == "dry_run" and report["publish"]["dry_run"] and hub.requests() == []
    assert (Path(report["export"]["manifest_path"])).name == "manifest.json"


def test_parity_failure_publishes_nothing(make_args: MakeArgs, signing_key: tuple[Path, str], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch, hub: InProcHub) -> None:
    def mismatch(*a: object, **k: object) -> float:
        raise ParityError("ONNX parity check failed: max abs difference 0.5 exceeds 0.001; nothing is published")

    monkeypatch.setattr(export_mod, "parity_check", mismatch)
    with pytest.raises(ParityError):
        main(make_args(publish="http://hub", sign_key=str(signing_key[0]), epochs=1), client_factory=factory_for(hub))
    assert hub.requests() == ["GET /v1/rollouts"]  # only the read that checked the hub before training
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["status"] == "failed" and "ParityError" in report["error"] and not report["published"]
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_a_corrupt_snapshot_stops_the_turn_before_training(make_args: MakeArgs, digits_npz: Path,
                                                           signing_key: tuple[Path, str], tmp_path: Path,
                                                           hub: InProcHub) -> None:
    x, y = digits_arrays()
    shas = [add_case(hub, f"c{i}", int(y[i]), png_bytes(x[i])) for i in range(10)]
    hub.hub.blobs.path(shas[4]).write_bytes(b"\x89PNG truncated")  # the hub's stored image rotted
    with pytest.raises(SnapshotError, match=f"case c4: blob {shas[4]} is corrupt"):
        main(make_args(data="hub:http://hub", base=f"npz:{digits_npz}", publish="http://hub",
                       sign_key=str(signing_key[0])), client_factory=factory_for(hub))
    assert posted(hub, "/v1/models") == 0
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert json.loads((tmp_path / "run" / "report.json").read_text())["status"] == "failed"


def test_publishing_without_a_key_fails_before_training(make_args: MakeArgs, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLYWHEEL_SIGNING_KEY", raising=False)
    with pytest.raises(InvalidInput, match="publishing needs a signing key"):
        main(make_args(publish="http://hub"))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_rollout_stages_are_validated() -> None:
    assert parse_stages("0.1,0.5,1.0") == [0.1, 0.5, 1.0]
    for bad in ("0.5,0.1,1.0", "0.1,0.5", "0,1", "a,b"):
        with pytest.raises(InvalidInput, match=repr(bad).replace(".", r"\.")):
            parse_stages(bad)
