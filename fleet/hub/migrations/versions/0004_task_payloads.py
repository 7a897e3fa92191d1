"""Cases and labels keep the wire payloads (schema 2: predictions and labels by task); labels carry what the
hub's consensus needs (overlap, ground truth, the gold answer) and the reason for its verdict.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

OLD_CASE_COLUMNS = ("probs", "scores", "triggers", "human_action", "challenger_version", "challenger_class",
                    "challenger_probs", "tags")


def upgrade() -> None:
    with op.batch_alter_table("cases") as batch:
        batch.add_column(sa.Column("task", sa.String(length=16), nullable=False, server_default="classify"))
        batch.add_column(sa.Column("payload", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("label_payload", sa.JSON(), nullable=True))
    with op.batch_alter_table("labels") as batch:
        batch.add_column(sa.Column("payload", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("overlap", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("ground_truth", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("gold_payload", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("reason", sa.Text(), nullable=False, server_default=""))
        batch.create_index("ix_labels_annotator", ["annotator"], unique=False)

    conn = op.get_bind()
    j = _json_param(conn)
    rows = conn.execute(sa.text(f"SELECT case_id, device_id, captured_at, model_version, predicted_class, "
                                f"image_sha256, image_size, priority, campaign_id, campaign_version, label, "
                                f"{', '.join(OLD_CASE_COLUMNS)} FROM cases")).mappings().all()
    for r in rows:
        conn.execute(sa.text(f"UPDATE cases SET payload = {j('payload')}, label_payload = {j('label')} "
                             f"WHERE case_id = :id"),
                     {"id": r["case_id"], "payload": json.dumps(_case_v2(r)),
                      "label": None if r["label"] is None else json.dumps(_classify(r["label"]))})
    for r in conn.execute(sa.text("SELECT id, label FROM labels")).mappings().all():
        conn.execute(sa.text(f"UPDATE labels SET payload = {j('p')} WHERE id = :id"),
                     {"id": r["id"], "p": json.dumps(_classify(r["label"]))})

    with op.batch_alter_table("cases") as batch:
        batch.alter_column("payload", existing_type=sa.JSON(), nullable=False)
        batch.alter_column("predicted_class", existing_type=sa.Integer(), nullable=True)
        for name in OLD_CASE_COLUMNS:
            batch.drop_column(name)
    with op.batch_alter_table("labels") as batch:
        batch.alter_column("payload", existing_type=sa.JSON(), nullable=False)
        batch.alter_column("label", existing_type=sa.Integer(), nullable=True)


def downgrade() -> None:
    with op.batch_alter_table("cases") as batch:
        batch.add_column(sa.Column("probs", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("scores", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("triggers", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("human_action", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("challenger_version", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("challenger_class", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("challenger_probs", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("tags", sa.JSON(), nullable=True))
    conn = op.get_bind()
    j = _json_param(conn)
    for r in conn.execute(sa.text("SELECT case_id, payload FROM cases")).mappings().all():
        p = r["payload"] if isinstance(r["payload"], dict) else json.loads(r["payload"])
        ch = p.get("challenger") or {}
        conn.execute(sa.text(
            f"UPDATE cases SET probs = {j('probs')}, scores = {j('scores')}, triggers = {j('triggers')}, "
            f"human_action = :human, challenger_version = :cv, challenger_class = :cc, "
            f"challenger_probs = {j('cp')}, tags = {j('tags')} WHERE case_id = :id"),
            {"id": r["case_id"], "probs": json.dumps(p["prediction"].get("probs") or []),
             "scores": json.dumps(p.get("scores") or {}), "triggers": json.dumps(p.get("triggers") or []),
             "human": (p.get("human_action") or {}).get("label"), "cv": ch.get("version"),
             "cc": (ch.get("prediction") or {}).get("label"),
             "cp": json.dumps((ch.get("prediction") or {}).get("probs")) if ch else None,
             "tags": json.dumps(p.get("tags") or {})})
    with op.batch_alter_table("cases") as batch:
        for name in ("probs", "scores", "triggers", "tags"):
            batch.alter_column(name, existing_type=sa.JSON(), nullable=False)
        for name in ("task", "payload", "label_payload"):
            batch.drop_column(name)
    with op.batch_alter_table("labels") as batch:
        batch.drop_index("ix_labels_annotator")
        for name in ("payload", "overlap", "ground_truth", "gold_payload", "reason"):
            batch.drop_column(name)


def _json_param(conn: Any) -> Any:
    """A JSON-typed bind parameter in this dialect's SQL (PostgreSQL needs the cast; SQLite stores the text)."""
    pg = conn.dialect.name == "postgresql"
    return lambda name: f"CAST(:{name} AS JSON)" if pg else f":{name}"


def _classify(label: int, probs: Any = None) -> dict[str, Any]:
    return {"task": "classify", "label": int(label), "probs": probs}


def _case_v2(r: Any) -> dict[str, Any]:
    """An old row's columns as a schema-2 Case (without its embedding, which stays in its column)."""
    def loads(v: Any) -> Any:
        return json.loads(v) if isinstance(v, str) else v

    challenger = None
    if r["challenger_version"] is not None and r["challenger_class"] is not None:
        challenger = {"version": r["challenger_version"],
                      "prediction": _classify(r["challenger_class"], loads(r["challenger_probs"]))}
    return {
        "schema": 2, "case_id": r["case_id"], "device_id": r["device_id"], "captured_at": r["captured_at"],
        "model_version": r["model_version"], "prediction": _classify(r["predicted_class"], loads(r["probs"])),
        "image_sha256": r["image_sha256"], "image_size": r["image_size"], "priority": r["priority"],
        "scores": loads(r["scores"]) or {}, "triggers": loads(r["triggers"]) or [], "campaign_id": r["campaign_id"],
        "campaign_version": r["campaign_version"],
        "human_action": None if r["human_action"] is None else _classify(r["human_action"]),
        "challenger": challenger, "tags": loads(r["tags"]) or {}, "embedding": None,
    }
