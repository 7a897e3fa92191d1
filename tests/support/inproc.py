"""The real hub (``fleet.hub.app.create_app``) in-process, for the tests of every part that talks to it.

:func:`inproc_hub` builds the app on SQLite in a test's folder (a copy of a migrated template, so no test
pays for the migrations) and answers through starlette's TestClient transport; any client that takes an
httpx transport talks to it (``hub.transport``, or ``hub.faults``: the same with scripted network faults,
see :mod:`tests.support.faults`). :meth:`InProcHub.serve` also serves it on loopback for a client that is
another process (Label Studio's webhooks, an agent started as a subprocess).

The harness does what the hub's users do, through the API: enroll devices, register and promote signed
models, start rollouts, create campaigns, ingest cases with chosen probabilities, embeddings and tags,
post labels. It reads back what the hub holds through the API or its database (cases, labels, OTA
reports, field metrics), and what it was sent through a tap on the app (heartbeats, label posts and their
receipts, every request with its status)::

    with inproc_hub(tmp_path, keypair) as hub:
        hub.publish("m1")                        # registered, signed, active
        token = hub.enroll("dev-1")
        client = HubClient(hub.http(), token=token)
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np

from fleet.protocol import (
    Case,
    Classification,
    Detection,
    LabelPost,
    LabelReceipt,
    RolloutPublic,
)
from fleet.signing import KeyPair, load_private_key
from tests.support.asgi import Tap, port_of, serve_app
from tests.support.cases import make_case
from tests.support.faults import FaultTransport
from tests.support.hubreads import HubReads
from tests.support.models import ModelFiles, make_model_files

BASE_URL = "http://hub.test"


# ---------------------------------------------------------------------------------------------
# building it
# ---------------------------------------------------------------------------------------------


H = TypeVar("H", bound="InProcHub")


@contextmanager
def inproc_hub(tmp: Path, keypair: KeyPair, *, kind: type[H] | None = None, seed: Callable[[H], None] | None = None,
               seed_key: str | None = None, clock: Callable[[], float] = time.time,
               public_url: str | None = None, **settings: Any) -> Iterator[H]:
    """The real hub on SQLite in ``tmp/hub``, trusting ``keypair``'s public key, until the block exits.

    ``seed`` fills it (models, devices, cases) once per test session and ``seed_key``: later hubs with
    the same key start from a copy of what it left (database, blobs, the harness's tokens and truths), which
    keeps tests that each need the same populated hub cheap. ``kind``: a subclass of :class:`InProcHub` with
    a part's own helpers. ``settings`` override :class:`fleet.hub.settings.HubSettings` fields.
    """
    cls: type[H] = kind or InProcHub  # type: ignore[assignment]
    data_dir = tmp / "hub"
    state: dict[str, Any] = {}
    if seed is not None:
        origin = _seeded_template(cls, seed, seed_key or seed.__qualname__, keypair, settings)
        shutil.copytree(origin, data_dir)
        state = json.loads((data_dir / STATE).read_text())
    else:
        data_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(_migrated_template(), data_dir / "hub.db")
    data_dir.chmod(0o700)
    hub = _start(cls, data_dir, keypair, clock=clock, public_url=public_url, **settings)
    hub.tokens.update(state.get("tokens", {}))
    hub.truth.update(state.get("truth", {}))
    try:
        yield hub
    finally:
        hub.close()


STATE = "harness.json"  # what a seeded template keeps of the harness besides the hub's data


def _start(cls: type[H], data_dir: Path, keypair: KeyPair, *, clock: Callable[[], float], public_url: str | None,
           **overrides: Any) -> H:
    from starlette.testclient import TestClient

    from fleet.hub.app import create_app
    from fleet.hub.settings import HubSettings

    values: dict[str, Any] = {"dev": True, "data_dir": data_dir, "signing_public_key": keypair.public_b64,
                              "public_url": public_url or BASE_URL, "migrate_on_start": False,
                              "webhook_secret": "webhook-secret-for-tests", "db_pool_size": 4}
    values.update(overrides)
    settings = HubSettings(**values)
    app = create_app(settings, clock=clock)
    tap = Tap(app)
    client = TestClient(tap, base_url=BASE_URL, raise_server_exceptions=True)
    client.__enter__()
    return cls(app=app, tap=tap, client=client, settings=settings, keypair=keypair, data_dir=data_dir)


_TEMPLATES: dict[str, Path] = {}
_TEMPLATE_LOCK = threading.Lock()


def _template_root() -> Path:
    root = _TEMPLATES.get("")
    if root is None:
        root = _TEMPLATES[""] = Path(tempfile.mkdtemp(prefix="flywheel-inproc-"))
        atexit.register(shutil.rmtree, root, True)
    return root


def _migrated_template() -> Path:
    """A migrated SQLite file, made once per process."""
    with _TEMPLATE_LOCK:
        path = _TEMPLATES.get("migrated")
        if path is None:
            from fleet.hub.db import make_engine, migrate

            path = _template_root() / "migrated.db"
            engine = make_engine(f"sqlite:///{path}", pool_size=1)
            migrate(engine)
            engine.dispose()
            _TEMPLATES["migrated"] = path
        return path


def _seeded_template(cls: type[H], seed: Callable[[H], None], key: str, keypair: KeyPair,
                     settings: dict[str, Any]) -> Path:
    name = f"seed:{cls.__qualname__}:{key}:{keypair.public_b64}:{sorted(settings.items())!r}"
    with _TEMPLATE_LOCK:
        path = _TEMPLATES.get(name)
        if path is not None:
            return path
    path = _template_root() / f"seed-{uuid.uuid4().hex[:8]}"
    path.mkdir(mode=0o700)
    shutil.copy(_migrated_template(), path / "hub.db")
    hub = _start(cls, path, keypair, clock=time.time, public_url=None, **settings)
    try:
        seed(hub)
        (path / STATE).write_text(json.dumps({"tokens": hub.tokens, "truth": hub.truth}))
    finally:
        hub.close()
    with _TEMPLATE_LOCK:
        _TEMPLATES[name] = path
    return path


# ---------------------------------------------------------------------------------------------
# the harness
# ---------------------------------------------------------------------------------------------


@dataclass
class InProcHub(HubReads):
    app: Any
    tap: Tap
    client: Any  # starlette's TestClient: an httpx.Client into the app
    settings: Any
    keypair: KeyPair
    data_dir: Path
    tokens: dict[str, str] = field(default_factory=dict)  # name -> bearer token (scopes, enrolled devices)
    truth: dict[str, int] = field(default_factory=dict)  # case id -> the class a test says it really is
    faults: FaultTransport = field(init=False)
    url: str = BASE_URL
    _seq: int = 0

    def __post_init__(self) -> None:
        self.faults = FaultTransport(self.transport)

    @property
    def hub(self) -> Any:
        """The app's :class:`fleet.hub.context.Hub` (settings, engine, blob store)."""
        return self.app.state.hub

    @property
    def transport(self) -> httpx.BaseTransport:
        """The app itself as an httpx transport (no faults)."""
        return self.client._transport  # type: ignore[no-any-return]

    def http(self, *, faults: bool = True, **kw: Any) -> httpx.Client:
        """An httpx client on the hub's base URL, through :attr:`faults` unless told otherwise."""
        return httpx.Client(base_url=self.url, transport=self.faults if faults else self.transport, **kw)

    def close(self) -> None:
        self.client.__exit__(None, None, None)

    @contextmanager
    def serve(self) -> Iterator[str]:
        """Serve this hub on a free loopback port (uvicorn in a thread) while the block runs; yields its URL.

        Image links the hub signs point there only if the hub was built with that ``public_url``: use
        :func:`free_port` first when a browser or Label Studio must follow them."""
        with serve_app(self.tap, port=port_of(self.settings.public_url)) as url:
            yield url

    # -- credentials ---------------------------------------------------------------------------

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.settings.admin_token.get_secret_value()}"}

    def token(self, scope: str) -> str:
        """A bearer token of ``scope`` (labeler, trainer, admin), one per scope and hub."""
        if scope not in self.tokens:
            r = self.client.post("/v1/tokens", json={"scope": scope, "name": f"{scope}-{uuid.uuid4().hex[:6]}"},
                                 headers=self.admin)
            assert r.status_code == 201, r.text
            self.tokens[scope] = str(r.json()["token"])
        return self.tokens[scope]

    def bearer(self, name: str) -> dict[str, str]:
        """Authorization header of a scope's token or an enrolled device's."""
        return {"Authorization": f"Bearer {self.tokens[name] if name in self.tokens else self.token(name)}"}

    def enroll(self, device_id: str, group: str = "default") -> str:
        """Enroll ``device_id`` with the fleet secret (again with its own token if enrolled); its token."""
        own = {"Authorization": f"Bearer {self.tokens[device_id]}"} if device_id in self.tokens else {}
        r = self.client.post("/v1/enroll", headers=own, json={
            "device_id": device_id, "group": group, "fleet_secret": self.settings.fleet_secret.get_secret_value()})
        assert r.status_code == 200, r.text
        self.tokens[device_id] = str(r.json()["token"])
        return self.tokens[device_id]

    @property
    def fleet_secret(self) -> str:
        return str(self.settings.fleet_secret.get_secret_value())

    @property
    def webhook_secret(self) -> str:
        return str(self.settings.webhook_secret.get_secret_value())

    # -- models, rollouts, campaigns -----------------------------------------------------------

    def model_files(self, version: str, *, directory: Path | None = None, **kw: Any) -> ModelFiles:
        """A tiny signed model (tests.support.models) under the hub's folder; ``kw`` as make_model_files."""
        kw.setdefault("private_key", load_private_key(self.keypair.private_pem))
        return make_model_files(directory or self.data_dir.parent / "models", version, **kw)

    def register(self, files: ModelFiles, *, onnx: bytes | None = None) -> dict[str, Any]:
        """Upload a signed model as the trainer does (``onnx``: other bytes than the file's)."""
        assert files.signed is not None
        r = self.client.post("/v1/models", headers=self.bearer("trainer"), data={"manifest": files.signed.to_json()},
                             files={"onnx": ("model.onnx", onnx if onnx is not None else files.onnx_path.read_bytes(),
                                             "application/octet-stream")})
        assert r.status_code in (200, 201), r.text
        return dict(r.json())

    def promote(self, version: str) -> None:
        """Make ``version`` the active model at once (an admin override when another one is active)."""
        r = self.client.post(f"/v1/models/{version}/promote", headers=self.admin,
                             json={"override": True, "reason": "tests: active at once"})
        assert r.status_code == 200, r.text

    def publish(self, version: str, *, files: ModelFiles | None = None, promote: bool = True,
                **kw: Any) -> ModelFiles:
        """Register ``files`` (or a new tiny model, ``kw`` as make_model_files) and, by default, promote it."""
        files = files or self.model_files(version, **kw)
        self.register(files)
        if promote:
            self.promote(files.manifest.version)
        return files

    def rollout(self, version: str, stages: list[float], stage_seconds: float | None = None) -> str:
        """Start a staged rollout of ``version`` (the canary runs it, the incumbent in shadow); its id."""
        r = self.client.post("/v1/rollouts", headers=self.bearer("trainer"),
                             json={"version": version, "stages": stages, "stage_seconds": stage_seconds})
        assert r.status_code == 201, r.text
        return RolloutPublic.from_json(r.content).rollout_id

    def advance(self, rollout_id: str) -> dict[str, Any]:
        r = self.client.post(f"/v1/rollouts/{rollout_id}/advance", headers=self.bearer("trainer"))
        assert r.status_code == 200, r.text
        return dict(r.json())

    def campaign(self, spec: dict[str, Any], *, groups: list[str] | None = None,
                 novelty_bank: str | None = None) -> None:
        """Create a campaign (a trigger spec aimed at ``groups``, every group by default)."""
        r = self.client.post("/v1/campaigns", headers=self.admin,
                             json={"spec": spec, "groups": groups or [], "novelty_bank": novelty_bank})
        assert r.status_code in (200, 201), r.text

    def novelty_bank(self, bank_id: str, *, model_version: str | None = None, **kw: Any) -> dict[str, Any]:
        """Build a novelty bank from the labeled cases' embeddings; the hub's row (``sha256`` among it)."""
        r = self.client.post("/v1/novelty-banks", headers=self.admin,
                             json={"bank_id": bank_id, "model_version": model_version, **kw})
        assert r.status_code == 201, r.text
        return dict(r.json())

    # -- cases and labels ----------------------------------------------------------------------

    def case(self, device_id: str, *, model_version: str = "m1", probs: list[float] | None = None,
             image: bytes | None = None, case_id: str | None = None, embedding: np.ndarray | None = None,
             **kw: Any) -> tuple[Case, bytes]:
        """A valid case (tests.support.cases.make_case) and its PNG, not sent."""
        self._seq += 1
        image = image if image is not None else noise_png(self._seq)
        case = make_case(case_id=case_id or f"c-{uuid.uuid4().hex[:12]}", device_id=device_id,
                         model_version=model_version, probs=probs or [0.5, 0.3, 0.2], image=image,
                         embedding=embedding, **kw)
        return case, image

    def post_case(self, case: Case, image: bytes, *, token: str | None = None) -> httpx.Response:
        token = token or self.tokens[case.device_id]
        return self.client.post("/v1/cases", headers={"Authorization": f"Bearer {token}"},
                                data={"case": case.to_json()}, files={"image": ("frame.png", image, "image/png")})

    def send_case(self, device_id: str, *, truth: int | None = None, **kw: Any) -> str:
        """Make and ingest one case (``kw`` as :meth:`case`); its id. ``truth``: its real class, kept in
        :attr:`truth`."""
        case, image = self.case(device_id, **kw)
        r = self.post_case(case, image)
        assert r.status_code == 201, r.text
        if truth is not None:
            self.truth[case.case_id] = truth
        return case.case_id

    def label(self, case_id: str, label: int | Detection, *, annotation_id: int | None = None,
              **kw: Any) -> LabelReceipt:
        """Post one annotator's answer (a LabelPost; ``label``: a class index, or the boxes of a detect case;
        ``kw`` sets its other fields) and return the receipt."""
        self._seq += 1
        gold = kw.pop("gold_label", None)
        post = LabelPost(case_id=case_id, label=_answer(label), annotator=kw.pop("annotator", "a@x.test"),
                         source=kw.pop("source", "tests"), task_id=kw.pop("task_id", self._seq),
                         annotation_id=annotation_id if annotation_id is not None else self._seq,
                         created_at=kw.pop("created_at", time.time()),
                         gold_label=None if gold is None else _answer(gold), **kw)
        r = self.client.post("/v1/labels", content=post.to_json(), headers={
            **self.bearer("labeler"), "content-type": "application/json"})
        assert r.status_code == 200, r.text
        return LabelReceipt.from_dict(r.json())

    def post_webhook(self, body: dict[str, Any]) -> None:
        """Deliver a Label Studio webhook body to the hub's inbox."""
        r = self.client.post("/v1/labeling/webhook", content=json.dumps(body),
                             headers={"x-flywheel-webhook-secret": self.webhook_secret,
                                      "content-type": "application/json"})
        assert r.status_code == 204, r.text


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _answer(label: int | Detection) -> Classification | Detection:
    return label if isinstance(label, Detection) else Classification(label)


def noise_png(seed: int, *, size: int = 16) -> bytes:
    """A small greyscale PNG of noise; distinct seeds give distinct images."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()
