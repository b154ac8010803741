"""The manifest as banks made before migrations hold it: clips, tags, change log, meta.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


# A migration states the schema as it was at its revision, never the live definition in
# memory_bank/manifest.py: that one moves on with later revisions.


def upgrade() -> None:
    op.create_table(
        "clips",
        sa.Column("clip_id", BigId, primary_key=True, autoincrement=True),
        sa.Column("caption", sa.Text, nullable=False),
        sa.Column("source_name", sa.Text, nullable=False),
        sa.Column("content_hash", sa.Text, nullable=False, unique=True),
        sa.Column("duration_s", sa.Float, nullable=False),
        sa.Column("fps", sa.Float, nullable=False),
        sa.Column("num_frames", sa.Integer, nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("encoder_version", sa.Text),
        sa.Column("has_latent", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("source_ext", sa.Text),
        sa.Column("embedder", sa.Text, nullable=False),
        sa.Column("text_embedding", sa.LargeBinary, nullable=False),
        sa.Column("visual_embedder", sa.Text),
        sa.Column("visual_embedding", sa.LargeBinary),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "clip_tags",
        sa.Column(
            "clip_id", BigId, sa.ForeignKey("clips.clip_id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("tag", sa.Text, primary_key=True),
    )
    op.create_index("clip_tags_by_tag", "clip_tags", ["tag", "clip_id"])
    op.create_table(
        "changes",
        sa.Column("seq", BigId, primary_key=True, autoincrement=True),
        sa.Column("clip_id", sa.BigInteger, nullable=False),
        sa.Column("op", sa.Text, sa.CheckConstraint("op IN ('add', 'delete')"), nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "meta",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in ("meta", "changes", "clip_tags", "clips"):
        op.drop_table(table)
