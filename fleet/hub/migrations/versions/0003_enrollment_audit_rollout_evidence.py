"""Enrollment grants and audit, per-device rollout evidence, the kind of a rollout.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLES = ["enrollment_grants", "enrollment_attempts", "rollout_device_metrics"]


def upgrade() -> None:
    op.create_table(
        "enrollment_grants",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("group", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("used_at", sa.Float(), nullable=True),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash"),
    )
    with op.batch_alter_table("enrollment_grants", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_enrollment_grants_device_id"), ["device_id"], unique=False)

    op.create_table(
        "enrollment_attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("client", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=True),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("enrollment_attempts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_enrollment_attempts_at"), ["at"], unique=False)
        batch_op.create_index(batch_op.f("ix_enrollment_attempts_device_id"), ["device_id"], unique=False)
        batch_op.create_index("ix_enrollment_attempts_client_at", ["client", "at"], unique=False)

    op.create_table(
        "rollout_device_metrics",
        sa.Column("rollout_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=128), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("heartbeats", sa.BigInteger(), nullable=False),
        sa.Column("health_failures", sa.BigInteger(), nullable=False),
        sa.Column("ota_failures", sa.BigInteger(), nullable=False),
        sa.Column("human_compared", sa.BigInteger(), nullable=False),
        sa.Column("human_disagreed", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("rollout_id", "version", "device_id"),
    )

    with op.batch_alter_table("rollouts") as batch:
        batch.add_column(sa.Column("kind", sa.String(length=16), nullable=False, server_default="staged"))


def downgrade() -> None:
    with op.batch_alter_table("rollouts") as batch:
        batch.drop_column("kind")
    for name in reversed(TABLES):
        op.drop_table(name)
