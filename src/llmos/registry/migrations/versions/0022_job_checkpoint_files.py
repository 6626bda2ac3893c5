"""The files of each fine-tuning job checkpoint, as blobs of the artifact store (so a job resumes on
any node from the store, and blob collection counts them as references).

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fine_tuning_job_checkpoint_files",
        sa.Column(
            "checkpoint_id",
            sa.String(64),
            sa.ForeignKey("fine_tuning_job_checkpoints.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("path", sa.String(512), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False, index=True),
    )


def downgrade() -> None:
    op.drop_table("fine_tuning_job_checkpoint_files")
