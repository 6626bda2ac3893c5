"""CPU-seconds used by each fine-tuning job and in the usage ledger (training CPU quota).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("fine_tuning_jobs") as batch:
        batch.add_column(sa.Column("cpu_seconds", sa.Float, nullable=False, server_default="0"))
    with op.batch_alter_table("usage") as batch:
        batch.add_column(sa.Column("cpu_seconds", sa.Float, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("cpu_seconds")
    with op.batch_alter_table("fine_tuning_jobs") as batch:
        batch.drop_column("cpu_seconds")
