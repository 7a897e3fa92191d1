"""Rollouts, field metrics, OTA reports, campaigns, novelty banks, the labeling inbox; model activation time.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TABLES = [
    "campaigns",
    "field_metrics",
    "heartbeat_states",
    "hub_state",
    "novelty_banks",
    "ota_reports",
    "rollouts",
    "webhook_events",
]


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("activated_at", sa.Float(), nullable=True))
    op.execute("UPDATE model_versions SET activated_at = status_changed_at WHERE status = 'active'")
    op.create_table(
        "campaigns",
        sa.Column("campaign_id", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("groups", sa.JSON(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=True),
        sa.Column("novelty_bank", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("deleted_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("campaign_id", "version"),
    )

    op.create_table(
        "field_metrics",
        sa.Column("scope", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=128), nullable=False),
        sa.Column("heartbeats", sa.BigInteger(), nullable=False),
        sa.Column("frames_seen", sa.BigInteger(), nullable=False),
        sa.Column("flagged", sa.BigInteger(), nullable=False),
        sa.Column("uploaded", sa.BigInteger(), nullable=False),
        sa.Column("evicted", sa.BigInteger(), nullable=False),
        sa.Column("upload_failures", sa.BigInteger(), nullable=False),
        sa.Column("health_failures", sa.BigInteger(), nullable=False),
        sa.Column("human_compared", sa.BigInteger(), nullable=False),
        sa.Column("human_disagreed", sa.BigInteger(), nullable=False),
        sa.Column("challenger_compared", sa.BigInteger(), nullable=False),
        sa.Column("challenger_agreed", sa.BigInteger(), nullable=False),
        sa.Column("ota_failures", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "version"),
    )

    op.create_table(
        "heartbeat_states",
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("boot_id", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=True),
        sa.Column("challenger_version", sa.String(length=128), nullable=True),
        sa.Column("values", sa.JSON(), nullable=False),
        sa.Column("sent_at", sa.Float(), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "boot_id"),
    )

    op.create_table(
        "hub_state",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )

    op.create_table(
        "novelty_banks",
        sa.Column("bank_id", sa.String(length=128), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("bank_id"),
    )

    op.create_table(
        "ota_reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=128), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("previous_version", sa.String(length=128), nullable=True),
        sa.Column("reported_at", sa.Float(), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("ota_reports", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ota_reports_device_id"), ["device_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_ota_reports_version"), ["version"], unique=False)

    op.create_table(
        "rollouts",
        sa.Column("rollout_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=128), nullable=False),
        sa.Column("incumbent", sa.String(length=128), nullable=True),
        sa.Column("stages", sa.JSON(), nullable=False),
        sa.Column("stage_index", sa.Integer(), nullable=False),
        sa.Column("stage_seconds", sa.Float(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("stage_started_at", sa.Float(), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("rollout_id"),
    )
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rollouts_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_rollouts_version"), ["version"], unique=False)

    op.create_table(
        "webhook_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("body_sha256", sa.String(length=64), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("body_sha256"),
    )


def downgrade() -> None:
    for name in reversed(TABLES):
        op.drop_table(name)
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("activated_at")
