"""Shadow trials: an operator runs a candidate as the challenger on one device group for N frames, reads its
field agreement, then promotes it to a canary (fleet.hub.shadows).

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "shadow_trials",
        sa.Column("trial_id", sa.String(128), primary_key=True),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("group", sa.String(128), nullable=False),
        sa.Column("frames", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("incumbent", sa.String(128), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("ended_at", sa.Float(), nullable=True),
        sa.Column("rollout_id", sa.String(128), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
    )
    op.create_index("ix_shadow_trials_group", "shadow_trials", ["group"])


def downgrade() -> None:
    op.drop_index("ix_shadow_trials_group", table_name="shadow_trials")
    op.drop_table("shadow_trials")
