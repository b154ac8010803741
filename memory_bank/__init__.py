"""Memory bank: clip store, ingest and retrieval indexes."""
