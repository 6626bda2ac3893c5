"""Stored chat completions (``store: true``) and the feedback given on them.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stored_completions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False, index=True),
        sa.Column("key_id", sa.String(32)),
        sa.Column("model", sa.String(512), nullable=False, index=True),
        sa.Column("messages", sa.JSON, nullable=False),
        sa.Column("request", sa.JSON, nullable=False),
        sa.Column("response", sa.JSON, nullable=False),
        sa.Column("metadata", sa.JSON),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    )
    op.create_table(
        "completion_feedback",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column(
            "completion_id",
            sa.String(64),
            sa.ForeignKey("stored_completions.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        sa.Column("tenant", sa.String(64), nullable=False, index=True),
        sa.Column("key_id", sa.String(32)),
        sa.Column("choice_index", sa.Integer, nullable=False),
        sa.Column("rating", sa.String(8)),
        sa.Column("score", sa.Float),
        sa.Column("correction", sa.String(32768)),
        sa.Column("tags", sa.JSON, nullable=False),
        sa.Column("comment", sa.String(2048)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    )


def downgrade() -> None:
    op.drop_table("completion_feedback")
    op.drop_table("stored_completions")
