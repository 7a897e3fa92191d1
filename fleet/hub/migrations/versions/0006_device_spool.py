"""Devices keep the spool their last heartbeat reported (bytes and items), for the fleet's view.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("spool_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("spool_items", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("spool_items")
        batch.drop_column("spool_bytes")
