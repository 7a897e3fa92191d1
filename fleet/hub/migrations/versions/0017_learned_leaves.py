"""A campaign's learned trigger for each model its devices run: the leaves fitted for the models other than the one
whose leaf is in the spec (a device group's own model beside the fleet's), by model version (fleet.hub.learned).

Revision ID: 0017
Revises: 0016
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("campaigns") as batch:
        batch.add_column(sa.Column("learned_leaves", sa.JSON(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("campaigns") as batch:
        batch.drop_column("learned_leaves")
