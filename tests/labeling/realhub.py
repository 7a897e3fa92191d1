"""The real hub (fleet.hub) served on loopback by uvicorn, with a model registered and cases ingested, for
integration tests and the benchmark: Label Studio posts its webhooks to it and loads its signed images."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.labeling.fakehub import png_for
from tests.labeling.lsserver import free_port


@dataclass
class RealHub:
    url: str
    client: httpx.Client
    admin: dict[str, str]
    labeler_token: str
    webhook_secret: str
    class_names: list[str]
    model_version: str
    truth: dict[str, int] = field(default_factory=dict)
    device: dict[str, str] = field(default_factory=dict)
    publish_model: Any = None  # (version) -> None: uploads a new model version and makes it active

    def publish(self, version: str) -> None:
        """A new model version, uploaded by the trainer and promoted: the fleet's next model."""
        self.publish_model(version)
        self.model_version = version

    def add_cases(self, n: int, *, seed: int = 0, model_version: str | None = None) -> list[str]:
        """Ingest ``n`` cases from one device, each with a PNG whose colour says its (true) class."""
        from tests.support.cases import make_case

        rng = np.random.default_rng(seed)
        k = len(self.class_names)
        ids = []
        for _ in range(n):
            truth = int(rng.integers(k))
            probs = rng.dirichlet(np.ones(k)).round(4)
            probs = (probs / probs.sum()).tolist()
            image = png_for(truth, k, seed=int(rng.integers(1000)), noise=rng)  # noise: no near-duplicates
            case = make_case(case_id=f"c-{uuid.uuid4().hex[:12]}", device_id="dev-1",
                             model_version=model_version or self.model_version, probs=probs, image=image,
                             embedding=rng.normal(size=16).astype(np.float32))
            r = self.client.post("/v1/cases", headers=self.device, data={"case": case.to_json()},
                                 files={"image": ("frame.png", image, "image/png")})
            assert r.status_code == 201, r.text
            self.truth[case.case_id] = truth
            ids.append(case.case_id)
        return ids

    def labels(self) -> list[dict[str, Any]]:
        """The hub's labels, each with its class as ``label`` (a classify answer's index)."""
        r = self.client.get("/v1/labels", headers={"Authorization": f"Bearer {self.labeler_token}"},
                            params={"limit": 10000})
        assert r.status_code == 200, r.text
        return [{**lb, "label": lb["label"]["label"]} for lb in r.json()["labels"]]

    def case(self, case_id: str) -> dict[str, Any]:
        r = self.client.get(f"/v1/cases/{case_id}", headers={"Authorization": f"Bearer {self.labeler_token}"})
        assert r.status_code == 200, r.text
        return dict(r.json())


@contextmanager
def serve_real_hub(tmp: Path, *, n_classes: int = 3) -> Iterator[RealHub]:
    import uvicorn

    from fleet.hub.app import create_app
    from fleet.hub.settings import HubSettings
    from fleet.signing import generate_keypair, load_private_key
    from tests.support.models import make_model_files

    keypair = generate_keypair()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = HubSettings(dev=True, data_dir=tmp / "hub", signing_public_key=keypair.public_b64, public_url=url)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    client = httpx.Client(base_url=url, timeout=30)
    try:
        admin = {"Authorization": f"Bearer {settings.admin_token.get_secret_value()}"}

        def token(scope: str) -> str:
            r = client.post("/v1/tokens", json={"scope": scope, "name": f"{scope}-{uuid.uuid4().hex[:6]}"},
                            headers=admin)
            assert r.status_code == 201, r.text
            return str(r.json()["token"])

        trainer = {"Authorization": f"Bearer {token('trainer')}"}
        parent: list[str] = []

        def publish(version: str) -> Any:
            files = make_model_files(tmp / "models", version, private_key=load_private_key(keypair.private_pem),
                                     num_classes=n_classes, parent=parent[-1] if parent else None,
                                     seed=len(parent))
            r = client.post("/v1/models", headers=trainer,
                            files={"onnx": ("model.onnx", files.onnx_path.read_bytes(), "application/octet-stream")},
                            data={"manifest": files.signed.to_json()})  # type: ignore[union-attr]
            assert r.status_code == 201, r.text
            r = client.post(f"/v1/models/{version}/promote", headers=admin,  # at once: the test's new model
                            json={"override": True, "reason": "the labeling tests' next model version"})
            assert r.status_code == 200, r.text
            parent.append(version)
            return files

        files = publish("m1")
        r = client.post("/v1/enroll", json={"device_id": "dev-1", "group": "default",
                                            "fleet_secret": settings.fleet_secret.get_secret_value()})
        assert r.status_code == 200, r.text
        hub = RealHub(url, client, admin, token("labeler"), settings.webhook_secret.get_secret_value(),
                      list(files.manifest.class_names), "m1",
                      device={"Authorization": f"Bearer {r.json()['token']}"}, publish_model=publish)
        yield hub
    finally:
        client.close()
        server.should_exit = True
        thread.join(10)
