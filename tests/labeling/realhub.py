"""The real hub (fleet.hub) for the labeling tests and the benchmark: in-process (tests/support/inproc.py) with a
model whose classes are the tests' and cases whose image colour says their true class, and served on loopback
when Label Studio must post webhooks to it and annotators' browsers must load its signed images.

The bridge talks to it through its in-process transport (with scripted faults, ``hub.faults``); Label Studio
and browsers through the loopback server; both reach the same app and database."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from fleet.protocol import Case, Selection
from fleet.signing import KeyPair, generate_keypair
from labeling.hub_client import HubClient
from tests.labeling.images import png_for
from tests.support.asgi import free_port
from tests.support.cases import make_case
from tests.support.inproc import InProcHub, inproc_hub

CLASSES = ["cat", "dog", "bird"]
DEVICE = "dev-1"
FIRST_MODEL = "m1"
_KEYS: list[KeyPair] = []


@dataclass
class LabelingHub(InProcHub):
    """The real hub with the labeling side's conveniences: the current model version, cases with a known true
    class, labels as flat rows (``label``: the class index), and the clusters its selections gave."""

    class_names: list[str] = field(default_factory=lambda: list(CLASSES))
    model_version: str = FIRST_MODEL

    @property
    def labeler_token(self) -> str:
        return self.token("labeler")

    @property
    def public_url(self) -> str:
        """Where annotators and Label Studio reach the hub (its signed image links point there)."""
        return str(self.settings.public_url).rstrip("/")

    def bridge_client(self, **kw: Any) -> HubClient:
        """The bridge's client of this hub, in-process through :attr:`faults` (``kw`` as HubClient's)."""
        return HubClient(self.public_url, self.labeler_token, http=self.http(), **kw)

    def next_model(self, version: str) -> None:
        """A new model version with the same classes, uploaded by the trainer and made active at once."""
        files = self.model_files(version, num_classes=len(self.class_names), class_names=list(self.class_names),
                                 parent=self.model_version, seed=sum(map(ord, version)))
        self.publish(version, files=files)
        self.model_version = version

    def add_cases(self, n: int, *, seed: int = 0, model_version: str | None = None,
                  prefix: str = "c") -> list[str]:
        """Ingest ``n`` cases from ``dev-1``, each with a PNG whose colour says its true class (kept in
        :attr:`truth`), a random class distribution and embedding."""
        truth = send_cases(self.client, self.bearer(DEVICE), n, n_classes=len(self.class_names), seed=seed,
                           model_version=model_version or self.model_version, prefix=prefix)
        self.truth.update(truth)
        return list(truth)

    def live_labels(self, case_id: str | None = None) -> list[dict[str, Any]]:
        """The hub's labels as rows, each with its class as ``label`` (a classify answer's index)."""
        return [{**lb.to_dict(), "label": lb.label.label} for lb in self.labels(case_id)]

    def predicted(self, case_id: str) -> int:
        """The class the model that made the case predicted."""
        return int(self.selected(case_id).case.prediction.label)

    def clusters(self) -> dict[str, int]:
        """Case id -> the diversity cluster the hub's latest selection of it gave (selections are the only
        answers that carry clusters)."""
        out: dict[str, int] = {}
        for x in self.tap.find("POST", "/v1/selections", status=200):
            out.update((c.case_id, c.cluster) for c in Selection.from_json(x.response).cases)
        return out

    def history(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request the hub answered, from any client."""
        return [(x.method, x.path, x.status) for x in list(self.tap.exchanges)]


def send_cases(http: httpx.Client, device: dict[str, str], n: int, *, n_classes: int, model_version: str,
               seed: int = 0, prefix: str = "c") -> dict[str, int]:
    """Post ``n`` cases (:func:`labeling_case`) from ``dev-1`` (``device``: its Authorization header) to a hub;
    case id -> true class, in the order sent."""
    rng = np.random.default_rng(seed)
    truth: dict[str, int] = {}
    for _ in range(n):
        case, image, cls = labeling_case(rng, n_classes, model_version=model_version,
                                         case_id=f"{prefix}-{uuid.uuid4().hex[:12]}")
        r = http.post("/v1/cases", headers=device, data={"case": case.to_json()},
                      files={"image": ("frame.png", image, "image/png")})
        assert r.status_code == 201, r.text
        truth[case.case_id] = cls
    return truth


def labeling_case(rng: np.random.Generator, k: int, *, model_version: str, case_id: str,
                  device_id: str = DEVICE) -> tuple[Case, bytes, int]:
    """(case, PNG, true class): an image coloured by a random true class (speckled: no near-duplicates), a random
    class distribution and 16-d embedding."""
    truth = int(rng.integers(k))
    probs = rng.dirichlet(np.ones(k)).round(4)
    probs = (probs / probs.sum()).tolist()
    image = png_for(truth, k, seed=int(rng.integers(1000)), noise=rng)
    case = make_case(case_id=case_id, device_id=device_id, model_version=model_version, probs=probs, image=image,
                     embedding=rng.normal(size=16).astype(np.float32))
    return case, image, truth


def keypair() -> KeyPair:
    """The fleet key pair of the labeling tests' hubs (one per session: seeded hubs are keyed by it)."""
    if not _KEYS:
        _KEYS.append(generate_keypair())
    return _KEYS[0]


def seeded(n_cases: int, *, class_names: list[str] | None = None) -> Callable[[LabelingHub], None]:
    """A seed: ``dev-1`` enrolled, model m1 with ``class_names`` active, a labeler token, ``n_cases`` cases."""
    def seed(hub: LabelingHub) -> None:
        hub.class_names = list(class_names or CLASSES)
        hub.enroll(DEVICE)
        files = hub.model_files(FIRST_MODEL, num_classes=len(hub.class_names), class_names=hub.class_names)
        hub.publish(FIRST_MODEL, files=files)
        hub.token("labeler")
        hub.add_cases(n_cases)

    return seed


@contextmanager
def labeling_hub(tmp: Path, n_cases: int = 0, *, serve: bool = False, class_names: list[str] | None = None,
                 **settings: Any) -> Iterator[LabelingHub]:
    """The real hub with model m1 (``class_names``, default cat/dog/bird) active and ``n_cases`` cases from
    ``dev-1`` (a copy of a per-session template); with ``serve``, also on loopback at its ``public_url``."""
    names = list(class_names or CLASSES)
    public_url = f"http://127.0.0.1:{free_port()}" if serve else None
    with inproc_hub(tmp, keypair(), kind=LabelingHub, seed=seeded(n_cases, class_names=names),
                    seed_key=f"labeling-{n_cases}-{','.join(names)}", public_url=public_url, **settings) as hub:
        hub.class_names = names
        if not serve:
            yield hub
            return
        with hub.serve():
            yield hub
