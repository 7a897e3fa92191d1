"""A campaign's learned trigger belongs to one model version: which model the learned leaf of a campaign version
was fitted for, and the rate it was asked for, so that the hub refits it for each new active model
(fleet.hub.learned).

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("campaigns") as batch:
        batch.add_column(sa.Column("learned_for", sa.String(128), nullable=True))
        batch.add_column(sa.Column("learned_rate", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("campaigns") as batch:
        batch.drop_column("learned_rate")
        batch.drop_column("learned_for")
