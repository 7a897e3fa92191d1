"""A rollout keeps, per device, its shadow comparisons of the candidate with the incumbent (rule 4 of
fleet.hub.evidence: rollback without humans).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rollout_device_metrics") as batch:
        batch.add_column(sa.Column("challenger_compared", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("challenger_agreed", sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("rollout_device_metrics") as batch:
        batch.drop_column("challenger_agreed")
        batch.drop_column("challenger_compared")
