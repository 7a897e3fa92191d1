"""Prediction histograms per model version from heartbeats, fleet-wide and per device in a rollout: the
prediction-shift rule of fleet.hub.evidence.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "prediction_counts",
        sa.Column("scope", sa.String(128), primary_key=True),
        sa.Column("version", sa.String(128), primary_key=True),
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("label", sa.String(16), primary_key=True),
        sa.Column("count", sa.BigInteger(), nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("prediction_counts")
