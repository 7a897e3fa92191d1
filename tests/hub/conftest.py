"""Hub test harness: the same tests on SQLite and on a real PostgreSQL server (FLYWHEEL_TEST_PG_URL)."""

from __future__ import annotations

import io
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleet.protocol import Case, DeviceList, DevicePublic, ModelList, ModelPublic
from fleet.signing import KeyPair, generate_keypair, load_private_key
from tests.support.cases import make_case
from tests.support.models import make_model_files
from tests.support.services import missing_service

PG_URL = os.environ.get("FLYWHEEL_TEST_PG_URL")
PG_ADMIN_URL = os.environ.get("FLYWHEEL_TEST_PG_ADMIN_URL")
BACKENDS = ["sqlite", "postgres"]


class FakeClock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


# ---------------------------------------------------------------------------------------------
# databases
# ---------------------------------------------------------------------------------------------


def _pg_admin() -> Any:
    import psycopg

    assert PG_ADMIN_URL is not None
    return psycopg.connect(PG_ADMIN_URL, autocommit=True)


def _pg_url(dbname: str) -> str:
    import sqlalchemy as sa

    assert PG_URL is not None
    return sa.make_url(PG_URL).set(database=dbname).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str | None]:
    """A migrated template database; each test copies it (CREATE DATABASE ... TEMPLATE)."""
    if not PG_URL or not PG_ADMIN_URL:
        yield None
        return
    from fleet.hub.db import make_engine, migrate

    name = f"flywheel_tmpl_{uuid.uuid4().hex[:8]}"
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    engine = make_engine(_pg_url(name), pool_size=2)
    migrate(engine)
    engine.dispose()
    yield name
    with _pg_admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fleet.hub.db import make_engine, migrate

    path = tmp_path_factory.mktemp("sqlite-template") / "hub.db"
    engine = make_engine(f"sqlite:///{path}", pool_size=1)
    migrate(engine)
    engine.dispose()
    return path


def fresh_database(backend: str, tmp_path: Path, *, sqlite_template: Path | None, pg_template: str | None,
                   migrated: bool = True) -> tuple[str, Any]:
    """(url, cleanup) of an empty database for one test; migrated from the template unless told not to."""
    if backend == "sqlite":
        path = tmp_path / f"hub-{uuid.uuid4().hex[:6]}.db"
        if migrated and sqlite_template is not None:
            shutil.copy(sqlite_template, path)
        return f"sqlite:///{path}", lambda: None
    if not PG_URL or not PG_ADMIN_URL:
        missing_service("FLYWHEEL_TEST_PG_URL is not set (scripts/test.sh starts PostgreSQL and sets it)")
    name = f"flywheel_t_{uuid.uuid4().hex[:10]}"
    with _pg_admin() as conn:
        if migrated:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
        else:
            conn.execute(f'CREATE DATABASE "{name}"')

    def cleanup() -> None:
        with _pg_admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return _pg_url(name), cleanup


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "postgres" and not PG_URL:
        missing_service("FLYWHEEL_TEST_PG_URL is not set (scripts/test.sh starts PostgreSQL and sets it)")
    return str(request.param)


@pytest.fixture
def database_url(backend: str, tmp_path: Path, sqlite_template: Path, pg_template: str | None) -> Iterator[str]:
    url, cleanup = fresh_database(backend, tmp_path, sqlite_template=sqlite_template, pg_template=pg_template)
    yield url
    cleanup()


# ---------------------------------------------------------------------------------------------
# the harness
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def keypair() -> KeyPair:
    return generate_keypair()


def png_bytes(seed: int, *, size: int = 16) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class HubHarness:
    client: Any
    app: Any
    settings: Any
    keypair: KeyPair
    clock: FakeClock
    tmp: Path
    devices: dict[str, dict[str, str]] = field(default_factory=dict)
    _seq: int = 0

    @property
    def hub(self) -> Any:
        return self.app.state.hub

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.settings.admin_token.get_secret_value()}"}

    def token(self, scope: str, name: str | None = None) -> dict[str, str]:
        name = name or f"{scope}-{uuid.uuid4().hex[:6]}"
        r = self.client.post("/v1/tokens", json={"scope": scope, "name": name}, headers=self.admin)
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['token']}"}

    @property
    def labeler(self) -> dict[str, str]:
        return self._cached("labeler")

    @property
    def trainer(self) -> dict[str, str]:
        return self._cached("trainer")

    def _cached(self, scope: str) -> dict[str, str]:
        key = f"__{scope}"
        if key not in self.devices:
            self.devices[key] = self.token(scope)
        return self.devices[key]

    def enroll(self, device_id: str, group: str = "default") -> dict[str, str]:
        """Enroll with the fleet secret; a device enrolled before re-enrolls with its own token."""
        r = self.client.post("/v1/enroll", json={"device_id": device_id, "fleet_secret":
                                                 self.settings.fleet_secret.get_secret_value(), "group": group},
                             headers=self.devices.get(device_id, {}))
        assert r.status_code == 200, r.text
        headers = {"Authorization": f"Bearer {r.json()['token']}"}
        self.devices[device_id] = headers
        return headers

    def model_files(self, version: str, **kw: Any) -> Any:
        key = load_private_key(self.keypair.private_pem)
        return make_model_files(self.tmp / "models", version, private_key=key, **kw)

    def register_model(self, version: str, *, promote: bool = False, **kw: Any) -> Any:
        files = self.model_files(version, **kw)
        r = self.client.post("/v1/models", headers=self.trainer,
                             files={"onnx": ("model.onnx", files.onnx_path.read_bytes(), "application/octet-stream")},
                             data={"manifest": files.signed.to_json()})
        assert r.status_code == 201, r.text
        if promote:  # active at once (an admin override, when another model is active)
            r = self.client.post(f"/v1/models/{version}/promote", headers=self.admin,
                                 json={"override": True, "reason": "test harness"})
            assert r.status_code == 200, r.text
        return files

    def models(self) -> list[ModelPublic]:
        """GET /v1/models, as the trainer reads it."""
        r = self.client.get("/v1/models", headers=self.trainer)
        assert r.status_code == 200, r.text
        return ModelList.from_json(r.content).models

    def model_statuses(self) -> dict[str, str]:
        return {m.version: m.status for m in self.models()}

    def devices_listed(self) -> dict[str, DevicePublic]:
        """GET /v1/devices, as an admin reads it."""
        r = self.client.get("/v1/devices", headers=self.admin)
        assert r.status_code == 200, r.text
        return {d.device_id: d for d in DeviceList.from_json(r.content).devices}

    def make_case(self, device_id: str, *, model_version: str = "m1", probs: list[float] | None = None,
                  image: bytes | None = None, embedding: np.ndarray | None = None, case_id: str | None = None,
                  **kw: Any) -> tuple[Case, bytes]:
        self._seq += 1
        image = image if image is not None else png_bytes(self._seq + 10_000 * len(self.devices))
        case = make_case(case_id=case_id or f"c-{uuid.uuid4().hex[:12]}", device_id=device_id,
                         captured_at=self.clock(), model_version=model_version, probs=probs or [0.5, 0.3, 0.2],
                         image=image, embedding=embedding, **kw)
        return case, image

    def post_case(self, case: Case, image: bytes, headers: dict[str, str] | None = None) -> Any:
        headers = headers if headers is not None else self.devices[case.device_id]
        return self.client.post("/v1/cases", headers=headers, data={"case": case.to_json()},
                                files={"image": ("frame.png", image, "image/png")})

    def send_case(self, device_id: str, **kw: Any) -> str:
        case, image = self.make_case(device_id, **kw)
        r = self.post_case(case, image)
        assert r.status_code == 201, r.text
        return case.case_id

    def label(self, case_id: str, label: int, *, annotation_id: int | None = None, gold: int | None = None,
              **kw: Any) -> Any:
        """Post one annotator's answer (a fleet.protocol.LabelPost); ``kw`` sets its other fields."""
        self._seq += 1
        body = {"case_id": case_id, "label": {"task": "classify", "label": label}, "annotator": "ann@example.com",
                "source": "label-studio", "task_id": self._seq,
                "annotation_id": annotation_id if annotation_id is not None else self._seq,
                "created_at": self.clock(), **kw}
        if gold is not None:
            body["gold_label"] = {"task": "classify", "label": gold}
        return self.client.post("/v1/labels", json=body, headers=self.labeler)


def build_settings(tmp: Path, database_url: str, keypair: KeyPair, **overrides: Any) -> Any:
    from fleet.hub.settings import HubSettings

    values: dict[str, Any] = {"dev": True, "data_dir": tmp, "database_url": database_url,
                              "signing_public_key": keypair.public_b64, "public_url": "http://hub.test",
                              "rollback_min_compared": 50}
    values.update(overrides)
    return HubSettings(**values)


@pytest.fixture
def hub_factory(database_url: str, tmp_path: Path, keypair: KeyPair) -> Iterator[Any]:
    """Make a harness with settings overrides; closes every client it made."""
    from starlette.testclient import TestClient

    from fleet.hub.app import create_app

    made: list[Any] = []

    def make(**overrides: Any) -> HubHarness:
        clock = FakeClock()
        settings = build_settings(tmp_path, overrides.pop("database_url", database_url), keypair, **overrides)
        app = create_app(settings, clock=clock)
        client = TestClient(app)
        client.__enter__()
        made.append(client)
        return HubHarness(client=client, app=app, settings=settings, keypair=keypair, clock=clock, tmp=tmp_path)

    yield make
    for c in made:
        c.__exit__(None, None, None)


@pytest.fixture
def hub(hub_factory: Any) -> HubHarness:
    """A hub with model m1 (3 classes, 16-d embeddings) registered and active, and device d1 enrolled."""
    h: HubHarness = hub_factory()
    h.register_model("m1", promote=True)
    h.enroll("d1")
    return h


@pytest.fixture
def bare_hub(hub_factory: Any) -> HubHarness:
    return hub_factory()  # type: ignore[no-any-return]
