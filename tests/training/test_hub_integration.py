"""Against a real hub process: pull a labeled snapshot, train, publish a signed model, start a rollout."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from fleet.cli import app
from fleet.protocol import SignedManifest
from fleet.signing import verify_manifest
from tests.support.cases import label_post, make_case
from tests.support.data import digits_arrays, png_bytes
from tests.support.hub import RunningHub, running_hub  # noqa: F401
from tests.support.models import make_model_files
from trigger import NoveltyBank


def seed_labeled_cases(hub: RunningHub, n: int, trainer: str, tmp_path: Path) -> None:
    """Register the fleet's current model m0, enroll a device, upload ``n`` dark digits as its cases, and
    label them as the labeling bridge would."""
    m0 = make_model_files(tmp_path / "m0", "m0", private_key=hub.private_key(), num_classes=10,
                          class_names=[str(i) for i in range(10)])  # the digits' classes, as the base data has
    r = httpx.post(hub.url + "/v1/models", headers={"Authorization": f"Bearer {trainer}"},
                   files={"onnx": ("model.onnx", m0.onnx_path.read_bytes(), "application/octet-stream")},
                   data={"manifest": m0.signed.to_json()})  # type: ignore[union-attr]
    assert r.status_code == 201, r.text
    r = httpx.post(hub.url + "/v1/enroll", json={"device_id": "dev-1", "fleet_secret": hub.fleet_secret})
    r.raise_for_status()
    device = {"Authorization": f"Bearer {r.json()['token']}"}
    labeler = {"Authorization": f"Bearer {hub.token('labeler')}"}
    x, y = digits_arrays()
    with httpx.Client(base_url=hub.url, timeout=30) as c:
        for i in range(n):
            png = png_bytes((x[i] // 4).astype(np.uint8))
            case = make_case(case_id=f"case-{i:04d}", device_id="dev-1", model_version="m0", probs=[0.1] * 10,
                             image=png, tags={"condition": "dark"}, triggers=[])
            r = c.post("/v1/cases", headers=device, data={"case": case.to_json()},
                       files={"image": ("frame.png", png, "image/png")})
            assert r.status_code in (200, 201), r.text
            r = c.post("/v1/labels", headers=labeler, json=label_post(case.case_id, int(y[i]), annotation_id=i + 1))
            assert r.status_code in (200, 201), r.text


@pytest.mark.slow
def test_train_publishes_to_a_real_hub(running_hub: RunningHub, digits_npz: Path,  # noqa: F811
                                       tmp_path: Path) -> None:
    hub = running_hub
    trainer = hub.token("trainer")
    seed_labeled_cases(hub, 40, trainer, tmp_path)
    key_path = tmp_path / "signing.key"
    key_path.write_bytes(hub.keypair.private_pem)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "train", "--data", f"hub:{hub.url}", "--base", f"npz:{digits_npz}", "--replay-ratio", "0.8",
        "--out", str(out), "--epochs", "2", "--width", "8", "--threads", "1", "--version", "hub-1",
        "--sign-key", str(key_path), "--publish", hub.url, "--token", trainer, "--rollout-stages", "0.5,1.0",
        "--cache-dir", str(tmp_path / "cache"), "--no-progress",
    ])
    assert result.exit_code == 0, result.output + hub.log()[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "published"
    assert report["data"]["snapshot"]["entries"] == 40
    assert report["metrics"]["test"]["per_slice"]["source=snapshot"]["n"] > 0

    headers = {"Authorization": f"Bearer {trainer}"}
    models = httpx.get(hub.url + "/v1/models", headers=headers).json()["models"]
    assert [m["version"] for m in models] == ["m0", "hub-1"]
    assert next(m for m in models if m["version"] == "hub-1")["parent_version"] is None
    signed = SignedManifest.from_json(httpx.get(hub.url + "/v1/models/hub-1/manifest", headers=headers).content)
    manifest = verify_manifest(signed, hub.keypair.public_b64)
    onnx = httpx.get(hub.url + "/v1/models/hub-1/onnx", headers=headers).content
    assert hashlib.sha256(onnx).hexdigest() == manifest.onnx_sha256 == report["export"]["sha256"]
    assert manifest.data_snapshot == f"hub-snapshot:{report['data']['snapshot']['id']}"
    # the model's novelty bank is on the hub, in the model's embedding space
    banks = {b["bank_id"]: b for b in httpx.get(hub.url + "/v1/novelty-banks", headers=headers).json()["banks"]}
    assert banks["model-hub-1"]["model_version"] == "hub-1" and banks["model-hub-1"]["dim"] == manifest.embedding_dim
    bank = NoveltyBank.from_bytes(httpx.get(hub.url + "/v1/novelty-banks/model-hub-1", headers=headers).content)
    assert bank.dim == manifest.embedding_dim and bank.meta["model_version"] == "hub-1"
    rollout_id = report["publish"]["rollout"]["rollout_id"]
    status = httpx.get(f"{hub.url}/v1/rollouts/{rollout_id}", headers=headers).json()
    assert status["version"] == "hub-1"


def test_a_hub_that_cannot_be_published_to_stops_the_run_before_it_trains(
        running_hub: RunningHub, digits_npz: Path, tmp_path: Path) -> None:  # noqa: F811
    """A token the hub refuses (unknown, or a labeler's, which may not publish), or a hub that is down, is found
    before the training, not after it, when only the upload is left (on a GPU, an hour later)."""
    from tests.support.asgi import free_port

    key_path = tmp_path / "signing.key"
    key_path.write_bytes(running_hub.keypair.private_pem)
    down = f"http://127.0.0.1:{free_port()}"
    for i, (url, token, said) in enumerate([(running_hub.url, "fwt_not-a-token", "401"),
                                            (running_hub.url, running_hub.token("labeler"), "403"),
                                            (down, running_hub.token("trainer"), "ConnectError")]):
        out = tmp_path / f"run{i}"
        result = CliRunner().invoke(app, [
            "train", "--data", f"npz:{digits_npz}", "--out", str(out), "--epochs", "1", "--width", "4",
            "--threads", "1", "--sign-key", str(key_path), "--publish", url, "--token", token, "--no-progress",
        ], env={"COLUMNS": "400"})
        text = " ".join(result.output.split())
        assert result.exit_code != 0 and f"cannot publish to {url}" in text and said in text, text
        report = json.loads((out / "report.json").read_text())
        assert report["status"] == "failed" and "checked before training" in report["error"], report
        assert "train" not in report["timings"] and not (out / "checkpoint.pt").exists(), report
