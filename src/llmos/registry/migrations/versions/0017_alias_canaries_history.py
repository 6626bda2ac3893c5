"""An alias's canary versions (a weighted split of its requests) and its history of targets.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def _alias_key() -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["name", "alias"], ["model_aliases.name", "model_aliases.alias"], ondelete="CASCADE")


def upgrade() -> None:
    op.create_table(
        "model_alias_canaries",
        sa.Column("name", sa.String(256), primary_key=True),
        sa.Column("alias", sa.String(64), primary_key=True),
        sa.Column(
            "model_id", sa.String(64), sa.ForeignKey("models.id", ondelete="CASCADE"), primary_key=True, index=True
        ),
        sa.Column("weight", sa.Float, nullable=False),
        _alias_key(),
    )
    op.create_table(
        "model_alias_history",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(256), nullable=False, index=True),
        sa.Column("alias", sa.String(64), nullable=False),
        sa.Column(
            "model_id", sa.String(64), sa.ForeignKey("models.id", ondelete="CASCADE"), nullable=False, index=True
        ),
        sa.Column("set_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rolled_back", sa.Boolean, nullable=False, server_default=sa.false()),
        _alias_key(),
    )
    # Aliases set before this revision start their history with their current target.
    op.execute(
        "INSERT INTO model_alias_history (name, alias, model_id, set_at, rolled_back) "
        "SELECT name, alias, model_id, updated_at, false FROM model_aliases"
    )


def downgrade() -> None:
    op.drop_table("model_alias_history")
    op.drop_table("model_alias_canaries")
