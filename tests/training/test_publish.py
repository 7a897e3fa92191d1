"""Publishing: what reaches the hub, and the faults after which nothing does."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from fleet.errors import InvalidInput
from fleet.signing import verify_manifest
from tests.support.data import digits_arrays, png_bytes
from training import export as export_mod
from training.bank import BANK_FILE, MAX_BANK_SIZE
from training.config import TrainArgs
from training.errors import ParityError, SnapshotError
from training.hub_client import HubClient
from training.publish import parse_stages
from training.train import main
from trigger import NoveltyBank

from .fakehub import FakeHub

MakeArgs = Callable[..., TrainArgs]


def factory_for(hub: FakeHub) -> Callable[[str], HubClient]:
    return lambda url: HubClient(url, "tok", transport=hub.transport(), sleep=lambda _: None)


def test_a_passing_candidate_is_uploaded_signed_and_rolled_out(
    make_args: MakeArgs, signing_key: tuple[Path, str]
) -> None:
    hub = FakeHub()
    report = main(make_args(publish="http://hub", sign_key=str(signing_key[0]), version="v7",
                            rollout_stages=[0.25, 1.0], stage_seconds=5.0), client_factory=factory_for(hub))
    assert report["status"] == "published" and report["published"]
    assert hub.posted("/v1/models") == 1 and hub.rollouts == [{"version": "v7", "stages": [0.25, 1.0],
                                                               "stage_seconds": 5.0}]
    uploaded = hub.models["v7"]
    manifest = verify_manifest(uploaded["manifest"], signing_key[1])
    assert manifest.onnx_size == len(uploaded["onnx"])
    assert report["publish"]["rollout"]["rollout_id"] == "r1" and "publish" in report["timings"]
    # the model's novelty bank went up before the rollout, built in its own embedding space
    assert hub.requests.index(("PUT", "/v1/models/v7/novelty-bank")) < hub.requests.index(("POST", "/v1/rollouts"))
    bank = NoveltyBank.from_bytes(hub.banks["v7"])
    assert bank.dim == manifest.embedding_dim and bank.meta["model_version"] == "v7"
    pool = report["data"]["new"]["n"] + (report["data"]["base"] or {"n": 0})["n"]
    assert len(bank) == min(MAX_BANK_SIZE, pool) and report["novelty_bank"].endswith(BANK_FILE)


def test_a_candidate_that_fails_the_gate_never_reaches_the_hub(
    make_args: MakeArgs, trained: Path, signing_key: tuple[Path, str]
) -> None:
    hub = FakeHub()
    report = main(make_args(publish="http://hub", sign_key=str(signing_key[0]), epochs=1, width=4,
                            gate_against=trained / "checkpoint.pt"), client_factory=factory_for(hub))
    assert report["status"] == "rejected" and not report["published"]
    assert hub.requests == []
    assert report["baseline"]["metrics"]["test"]["accuracy"] > report["metrics"]["test"]["accuracy"]


def test_dry_run_talks_to_no_hub(make_args: MakeArgs, signing_key: tuple[Path, str]) -> None:
    hub = FakeHub()
    report = main(make_args(publish="http://hub", sign_key=str(signing_key[0]), dry_run=True, epochs=1),
                  client_factory=factory_for(hub))
    assert report["status"] == "dry_run" and report["publish"]["dry_run"] and hub.requests == []
    assert (Path(report["export"]["manifest_path"])).name == "manifest.json"


def test_parity_failure_publishes_nothing(make_args: MakeArgs, signing_key: tuple[Path, str], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def mismatch(*a: object, **k: object) -> float:
        raise ParityError("ONNX parity check failed: max abs difference 0.5 exceeds 0.001; nothing is published")

    monkeypatch.setattr(export_mod, "parity_check", mismatch)
    hub = FakeHub()
    with pytest.raises(ParityError):
        main(make_args(publish="http://hub", sign_key=str(signing_key[0]), epochs=1), client_factory=factory_for(hub))
    assert hub.requests == []
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["status"] == "failed" and "ParityError" in report["error"] and not report["published"]
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_a_corrupt_snapshot_stops_the_turn_before_training(make_args: MakeArgs, digits_npz: Path,
                                                           signing_key: tuple[Path, str], tmp_path: Path) -> None:
    x, y = digits_arrays()
    hub = FakeHub()
    for i in range(10):
        hub.add_case(f"c{i}", int(y[i]), png_bytes(x[i]))
    sha = hub.cases[4]["image_sha256"]
    hub.blobs[sha] = b"\x89PNG truncated"
    with pytest.raises(SnapshotError, match=f"case c4: blob {sha} is corrupt"):
        main(make_args(data="hub:http://hub", base=f"npz:{digits_npz}", publish="http://hub",
                       sign_key=str(signing_key[0])), client_factory=factory_for(hub))
    assert hub.posted("/v1/models") == 0
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
