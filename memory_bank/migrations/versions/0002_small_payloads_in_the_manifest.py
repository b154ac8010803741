"""Clip tokens and posters move from files into the manifest (clip_tokens, clip_posters).

The files of banks made before are read into these tables when the bank opens
(``ClipStore._adopt_file_payloads``): a migration changes the schema, the bank moves the data.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "clip_tokens",
        sa.Column(
            "clip_id", BigId, sa.ForeignKey("clips.clip_id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("encoder_version", sa.Text, primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "clip_posters",
        sa.Column(
            "clip_id", BigId, sa.ForeignKey("clips.clip_id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("jpeg", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("clip_posters")
    op.drop_table("clip_tokens")
