"""Fixtures for the edge agent's tests: a fleet key pair, signed tiny models, a fake hub."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fleet.signing import generate_keypair, load_private_key
from tests.edge.fakehub import FakeHub
from tests.support.models import ModelFiles, make_model_files


@dataclass
class Keys:
    private: Any
    public_b64: str


@pytest.fixture(scope="session")
def keys() -> Keys:
    pair = generate_keypair()
    return Keys(private=load_private_key(pair.private_pem), public_b64=pair.public_b64)


@pytest.fixture(scope="session")
def other_keys() -> Keys:
    pair = generate_keypair()
    return Keys(private=load_private_key(pair.private_pem), public_b64=pair.public_b64)


@pytest.fixture
def make_model(tmp_path: Path, keys: Keys):  # type: ignore[no-untyped-def]
    """make_model(version, **kwargs) -> ModelFiles signed with the fleet key."""

    def build(version: str, **kwargs: Any) -> ModelFiles:
        kwargs.setdefault("private_key", keys.private)
        return make_model_files(tmp_path / "published", version, **kwargs)

    return build


@pytest.fixture
def hub(keys: Keys) -> FakeHub:
    return FakeHub(public_key=keys.public_b64)


def publish(hub: FakeHub, files: ModelFiles) -> None:
    assert files.signed is not None
    hub.publish(files.signed.to_json(), files.onnx_path.read_bytes())
