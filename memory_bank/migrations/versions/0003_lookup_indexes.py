"""Indexes for the questions asked of every clip on open: which embedders, which encoders.

Without them a bank of 1M clips was scanned whole (gigabytes of rows) each time a process opened
it, to learn that every caption was embedded by the configured model.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

INDEXES = {
    "clips_by_embedder": "embedder",
    "clips_by_visual_embedder": "visual_embedder",
    "clips_by_encoder_version": "encoder_version",
}


def upgrade() -> None:
    for name, column in INDEXES.items():
        op.create_index(name, "clips", [column])


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name="clips")
