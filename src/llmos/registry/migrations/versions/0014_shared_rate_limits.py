"""Shared rate limits: subjects, the last minute's requests and tokens, leases in flight.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rate_subjects",
        sa.Column("subject", sa.String(128), primary_key=True),
        sa.Column("touched_at", sa.Float, nullable=False),
    )
    op.create_table(
        "rate_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("subject", sa.String(128), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("requests", sa.Integer, nullable=False),
        sa.Column("tokens", sa.Integer, nullable=False),
    )
    op.create_index("ix_rate_events_subject_at", "rate_events", ["subject", "at"])
    op.create_table(
        "rate_leases",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("subject", sa.String(128), nullable=False, index=True),
        sa.Column("expires_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("rate_leases")
    op.drop_index("ix_rate_events_subject_at", table_name="rate_events")
    op.drop_table("rate_events")
    op.drop_table("rate_subjects")
