"""Evals: evals, their runs, each run's graded output items.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "evals",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False, index=True),
        sa.Column("name", sa.String(512), nullable=False),
        sa.Column("data_source_config", sa.JSON, nullable=False),
        sa.Column("testing_criteria", sa.JSON, nullable=False),
        sa.Column("metadata", sa.JSON),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "eval_runs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("eval_id", sa.String(64), sa.ForeignKey("evals.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("tenant", sa.String(64), nullable=False, index=True),
        sa.Column("key_id", sa.String(32)),
        sa.Column("name", sa.String(512), nullable=False),
        sa.Column("model", sa.String(512), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("data_source", sa.JSON, nullable=False),
        sa.Column("items", sa.JSON, nullable=False),
        sa.Column("generation", sa.JSON),
        sa.Column("error", sa.JSON),
        sa.Column("metadata", sa.JSON),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "eval_output_items",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column(
            "run_id", sa.String(64), sa.ForeignKey("eval_runs.id", ondelete="CASCADE"), nullable=False, index=True
        ),
        sa.Column("eval_id", sa.String(64), nullable=False),
        sa.Column("item_index", sa.Integer, nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("results", sa.JSON, nullable=False),
        sa.Column("sample", sa.JSON, nullable=False),
        sa.Column("usage", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("run_id", "item_index", name="uq_eval_output_items_run_item"),
    )


def downgrade() -> None:
    op.drop_table("eval_output_items")
    op.drop_table("eval_runs")
    op.drop_table("evals")
