"""A classifier's class probabilities kept with each re-scored case (float32 bytes), for selection strategies
that need them beside the embedding (BADGE's gradient embedding, fleet.hub.selection.gradient_embeddings).

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("case_scores") as batch:
        batch.add_column(sa.Column("probs", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("case_scores") as batch:
        batch.drop_column("probs")
