"""Users' ratings of vector store items, which recommendations read.

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vector_item_feedback",
        sa.Column(
            "vector_store_id",
            sa.String(64),
            sa.ForeignKey("vector_stores.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("user", sa.String(256), primary_key=True),
        sa.Column("file_id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False, index=True),
        sa.Column("rating", sa.String(8), nullable=False),
        sa.Column("key_id", sa.String(32)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("vector_item_feedback")
