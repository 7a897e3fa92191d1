"""Settings: typed, from the environment, and refusing default secrets outside dev mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.errors import InvalidInput
from fleet.hub.settings import HubSettings
from fleet.signing import generate_keypair


def test_defaults_are_refused_outside_dev_mode(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="FLYWHEEL_HUB_FLEET_SECRET"):
        HubSettings(data_dir=tmp_path).check()
    HubSettings(data_dir=tmp_path, dev=True).check()


def test_strong_secrets_and_a_key_are_accepted(tmp_path: Path) -> None:
    pair = generate_keypair()
    s = HubSettings(data_dir=tmp_path, fleet_secret="f" * 32, admin_token="a" * 32, url_secret="u" * 32,
                    webhook_secret="w" * 32, signing_public_key=pair.public_b64)
    s.check()
    no_key = s.model_copy(update={"signing_public_key": None})
    with pytest.raises(InvalidInput, match="signing key"):
        no_key.check()


def test_create_app_refuses_to_start_with_defaults(tmp_path: Path) -> None:
    from fleet.hub.app import create_app

    with pytest.raises(InvalidInput, match="dev mode"):
        create_app(HubSettings(data_dir=tmp_path))


def test_environment_is_read_with_the_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_HUB_DEV", "1")
    monkeypatch.setenv("FLYWHEEL_HUB_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FLYWHEEL_HUB_ROLLBACK_MARGIN", "0.2")
    s = HubSettings()
    assert s.dev and s.rollback_margin == 0.2
    assert s.resolved_database_url() == f"sqlite:///{(tmp_path / 'hub.db').resolve()}"
    assert s.resolved_blob_dir() == tmp_path / "blobs"


def test_bad_values_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="database_url"):
        HubSettings(database_url="hub.db")
    with pytest.raises(ValueError):
        HubSettings(rollback_margin=2.0)


def test_public_key_from_a_file(tmp_path: Path) -> None:
    pair = generate_keypair()
    f = tmp_path / "signing.pub"
    f.write_text(pair.public_b64 + "\n")
    assert HubSettings(signing_public_key_file=f).public_key() == pair.public_b64


def test_sqlite_memory_is_bounded_for_every_pooled_connection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each pooled SQLite connection would keep its own page cache; the soft heap limit bounds them together."""
    from fleet.hub.app import create_app

    monkeypatch.setenv("FLYWHEEL_HUB_SQLITE_MEMORY_MIB", "8")
    app = create_app(HubSettings(dev=True, data_dir=tmp_path))
    engine = app.state.hub.engine
    conns = [engine.connect() for _ in range(3)]
    try:
        assert {c.exec_driver_sql("PRAGMA soft_heap_limit").scalar() for c in conns} == {8 * 1024 * 1024}
    finally:
        for c in conns:
            c.close()
        engine.dispose()


def test_a_bad_sqlite_memory_limit_is_refused_with_what_was_received(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv("FLYWHEEL_HUB_SQLITE_MEMORY_MIB", "0")
    with pytest.raises(ValidationError, match="sqlite_memory_mib") as info:
        HubSettings(dev=True)
    assert "greater than or equal to 1" in str(info.value) and "input_value='0'" in str(info.value)


def test_the_hub_creates_its_data_dir_and_database_private(tmp_path: Path) -> None:
    import os
    import stat

    from fleet.hub.db import make_engine, migrate

    old = os.umask(0o022)
    try:
        engine = make_engine(f"sqlite:///{tmp_path / 'hub-data' / 'hub.db'}", pool_size=1)
        migrate(engine)
        engine.dispose()
    finally:
        os.umask(old)
    data = tmp_path / "hub-data"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    files = [p for p in data.iterdir() if p.name.startswith("hub.db")]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files), [
        (p.name, oct(p.stat().st_mode)) for p in files]
