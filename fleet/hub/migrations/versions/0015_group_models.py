"""Device groups with their own model: a group's pinned model version (``group_models``; a group without a row
runs the fleet's active model) and the group a rollout is aimed at (``rollouts.group``; null: the fleet).

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "group_models",
        sa.Column("group", sa.String(128), primary_key=True),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("previous", sa.String(128), nullable=True),
        sa.Column("rollout_id", sa.String(64), nullable=True),
        sa.Column("set_at", sa.Float(), nullable=False),
    )
    with op.batch_alter_table("rollouts") as batch:
        batch.add_column(sa.Column("group", sa.String(128), nullable=True))
        batch.create_index("ix_rollouts_group", ["group"])


def downgrade() -> None:
    with op.batch_alter_table("rollouts") as batch:
        batch.drop_index("ix_rollouts_group")
        batch.drop_column("group")
    op.drop_table("group_models")
