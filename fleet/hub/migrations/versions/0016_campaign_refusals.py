"""Campaign versions a device could not run: the reason its agent gave, when, and how many times
(``POST /v1/campaign-refusals``, ``GET /v1/campaigns/{id}/refusals``).

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "campaign_refusals",
        sa.Column("campaign_id", sa.String(128), primary_key=True),
        sa.Column("version", sa.Integer(), primary_key=True),
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("refused_at", sa.Float(), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("times", sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("campaign_refusals")
