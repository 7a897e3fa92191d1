"""Alembic migrations: an upgrade keeps the data, and the revisions agree with the SQLModel tables."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from fleet.hub.db import current_revision, make_engine, migrate
from fleet.protocol import Case, Classification
from tests.hub.conftest import fresh_database


@pytest.fixture
def empty_url(backend: str, tmp_path: Path, pg_template: str | None) -> Iterator[str]:
    url, cleanup = fresh_database(backend, tmp_path, sqlite_template=None, pg_template=pg_template, migrated=False)
    yield url
    cleanup()


def test_upgrade_from_the_first_revision_keeps_data(empty_url: str, tmp_path: Path, keypair: Any) -> None:
    engine = make_engine(empty_url, pool_size=2)
    try:
        migrate(engine, "0001")
        assert current_revision(engine) == "0001"
        with engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO devices (device_id, \"group\", enrolled_at) VALUES ('old-dev', 'default', 1.0)"))
            conn.execute(sa.text(
                "INSERT INTO model_versions (version, status, onnx_sha256, onnx_size, signed_manifest, class_names,"
                " embedding_dim, metrics, created_at, uploaded_at, status_changed_at) VALUES ('m0', 'active',"
                " :sha, 10, '{}', '[\"a\", \"b\"]', 4, '{}', 1.0, 1.0, 5.0)"), {"sha": "a" * 64})
            conn.execute(sa.text(
                "INSERT INTO cases (case_id, device_id, captured_at, received_at, model_version, predicted_class,"
                " probs, uncertainty, priority, scores, triggers, tags, image_sha256, image_size, state)"
                " VALUES ('old-case', 'old-dev', 1.0, 1.0, 'm0', 1, '[0.4, 0.6]', 0.8, 0.0, '{}', '[]', '{}',"
                " :sha, 10, 'unlabeled')"), {"sha": "b" * 64})
        migrate(engine)
        assert current_revision(engine) == "0017"
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT device_id FROM devices")).scalars().all() == ["old-dev"]
            assert conn.execute(sa.text("SELECT case_id FROM cases")).scalars().all() == ["old-case"]
            payload = conn.execute(sa.text("SELECT payload FROM cases")).scalar()
            case = Case.from_dict(json.loads(payload) if isinstance(payload, str) else payload)  # schema 2 now
            assert case.prediction == Classification(1, [0.4, 0.6]) and case.model_version == "m0"
            row = conn.execute(sa.text("SELECT status, activated_at FROM model_versions")).one()
            assert tuple(row) == ("active", 5.0)
            assert conn.execute(sa.text("SELECT count(*) FROM rollouts")).scalar() == 0
        migrate(engine)  # a second start is a no-op
    finally:
        engine.dispose()

    # and the hub serves the old data
    from starlette.testclient import TestClient

    from fleet.hub.app import create_app
    from tests.hub.conftest import build_settings

    app = create_app(build_settings(tmp_path, empty_url, keypair))
    with TestClient(app) as client:
        admin = {"Authorization": "Bearer dev-admin-token"}
        assert [d["device_id"] for d in client.get("/v1/devices", headers=admin).json()["devices"]] == ["old-dev"]
        assert client.get("/v1/summary", headers=admin).json()["models"]["m0"]["cases"] == 1


def test_rollout_evidence_kept_before_0007_gains_no_shadow_comparisons(empty_url: str) -> None:
    engine = make_engine(empty_url, pool_size=2)
    try:
        migrate(engine, "0006")
        with engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO rollout_device_metrics (rollout_id, version, device_id, heartbeats, health_failures,"
                " ota_failures, human_compared, human_disagreed) VALUES ('ro-1', 'm2', 'd1', 3, 1, 0, 40, 9)"))
        migrate(engine)
        with engine.connect() as conn:
            row = conn.execute(sa.text(
                "SELECT human_compared, human_disagreed, challenger_compared, challenger_agreed"
                " FROM rollout_device_metrics")).one()
        assert tuple(row) == (40, 9, 0, 0)
    finally:
        engine.dispose()


def test_revisions_match_the_tables(empty_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlmodel import SQLModel

    import fleet.hub.models  # noqa: F401

    engine = make_engine(empty_url, pool_size=2)
    try:
        migrate(engine)
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), SQLModel.metadata)
        assert diff == []
    finally:
        engine.dispose()


def test_downgrade_to_the_first_revision(empty_url: str) -> None:
    from alembic import command

    from fleet.hub.db import alembic_config

    engine = make_engine(empty_url, pool_size=2)
    try:
        migrate(engine)
        cfg = alembic_config(engine)
        with engine.connect() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0001")
            conn.commit()
        assert current_revision(engine) == "0001"
        assert "rollouts" not in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()
