"""Scores per (case, model version): the pool re-scored and re-embedded by the active model
(fleet.hub.rescore), so selection works in one model's space.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "case_scores",
        sa.Column("case_id", sa.String(128), primary_key=True),
        sa.Column("model_version", sa.String(128), primary_key=True),
        sa.Column("uncertainty", sa.Float(), nullable=True),
        sa.Column("predicted_class", sa.Integer(), nullable=True),
        sa.Column("embedding", sa.LargeBinary(), nullable=True),
        sa.Column("embedding_dim", sa.Integer(), nullable=True),
        sa.Column("scored_at", sa.Float(), nullable=False),
        sa.Column("error", sa.String(512), nullable=True),
    )
    op.create_index("ix_case_scores_version_uncertainty", "case_scores", ["model_version", "uncertainty"])


def downgrade() -> None:
    op.drop_index("ix_case_scores_version_uncertainty", table_name="case_scores")
    op.drop_table("case_scores")
