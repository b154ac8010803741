"""Alembic environment of the bank manifest: migrations run on the connection that opened the
bank (see ``memory_bank.manifest.upgrade``), never from a config file."""

from __future__ import annotations

from alembic import context

from memory_bank.manifest import metadata

connection = context.config.attributes["connection"]
# Batch mode: SQLite can only ALTER a table by copying it, which batch operations do for us.
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
