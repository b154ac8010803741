"""Memory bank: clip store, ingest and retrieval indexes."""

import model  # noqa: F401  (first: it quiets known import-time warnings of its libraries)
