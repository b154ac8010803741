"""Who added each clip (``clips.owner``): deleting a clip takes its owner or an admin.

Clips of banks made before have no owner; only an admin (or the operator's CLI) deletes them.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("clips", sa.Column("owner", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("clips") as batch:  # SQLite rebuilds the table to drop a column
        batch.drop_column("owner")
