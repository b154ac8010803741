"""Typed errors of the memory bank; the service maps them to HTTP statuses."""

from __future__ import annotations


class BankError(Exception):
    """Base class for every error the memory bank raises on purpose."""


class ClipNotFound(BankError):
    """No clip with this id is in the bank."""


class ClipRejected(BankError):
    """An upload failed validation (not a video, too long, too large, ...); nothing was stored."""


class BankCorrupt(BankError):
    """Bank files disagree with the manifest in a way that cannot be repaired automatically."""


class IndexCorrupt(BankError):
    """An index file cannot be read; ``ditmem index rebuild`` recreates it from the manifest."""


class DuplicateClip(BankError):
    """A clip with the same content is already in the manifest (added concurrently)."""
