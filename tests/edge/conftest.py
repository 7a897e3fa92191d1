"""Fixtures for the edge agent's tests: a fleet key pair, signed tiny models, and the real hub in-process
(tests/support/inproc.py) with device ``dev-1`` enrolled."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleet.edge.hubclient import HubClient
from fleet.signing import KeyPair, generate_keypair, load_private_key
from tests.support.inproc import InProcHub, inproc_hub
from tests.support.models import ModelFiles, make_model_files

DEVICE = "dev-1"


@dataclass
class Keys:
    private: Any
    public_b64: str
    pair: KeyPair


def _keys() -> Keys:
    pair = generate_keypair()
    return Keys(private=load_private_key(pair.private_pem), public_b64=pair.public_b64, pair=pair)


@pytest.fixture(scope="session")
def keys() -> Keys:
    return _keys()


@pytest.fixture(scope="session")
def other_keys() -> Keys:
    return _keys()


@pytest.fixture
def make_model(tmp_path: Path, keys: Keys):  # type: ignore[no-untyped-def]
    """make_model(version, **kwargs) -> ModelFiles signed with the fleet key."""

    def build(version: str, **kwargs: Any) -> ModelFiles:
        kwargs.setdefault("private_key", keys.private)
        return make_model_files(tmp_path / "published", version, **kwargs)

    return build


def _enrolled(hub: InProcHub) -> None:
    hub.enroll(DEVICE)


@pytest.fixture
def hub(tmp_path: Path, keys: Keys) -> Iterator[InProcHub]:
    """The real hub, trusting the fleet key, with ``dev-1`` enrolled and no model yet."""
    with inproc_hub(tmp_path, keys.pair, seed=_enrolled, seed_key="edge") as h:
        yield h


def client(hub: InProcHub, token: str | None = None) -> HubClient:
    """``dev-1``'s client, through the hub's fault transport (``token``: another one than its own)."""
    return HubClient(hub.http(), token=hub.tokens[DEVICE] if token is None else token)


def publish(hub: InProcHub, files: ModelFiles) -> None:
    """Upload a model to the hub's registry, as the trainer does (a candidate: nobody runs it yet)."""
    hub.register(files)


def bank(hub: InProcHub, embeddings: np.ndarray, *, bank_id: str = "bank-1", version: str = "vb") -> dict[str, Any]:
    """A novelty bank built by the hub (``bank_id``; its row, ``sha256`` among it) from labeled cases with these
    embeddings, sent by ``dev-1`` from model ``version`` (registered here with that embedding width)."""
    hub.publish(version, promote=False, embedding_dim=int(embeddings.shape[1]), seed=9)
    for e in embeddings:
        hub.label(hub.send_case(DEVICE, model_version=version, embedding=e), 0)
    return hub.novelty_bank(bank_id, model_version=version)


def assign(hub: InProcHub, active: ModelFiles | None = None, *, campaigns: tuple[dict[str, Any], ...] = ()) -> None:
    """Make ``active`` the fleet's model (an admin promotion, at once) and aim ``campaigns`` at every device."""
    if active is not None:
        hub.promote(active.manifest.version)
    for spec in campaigns:
        hub.campaign(spec)
