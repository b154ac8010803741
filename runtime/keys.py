"""API keys as settings hold them: a name, the SHA-256 of the secret, and read/write scopes.

Only hashes are ever configured; the secret is shown once, when ``ditmem keys new`` makes it.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Literal

from pydantic import BaseModel, Field

# read: see the bank and one's own jobs; write: submit jobs, add clips, delete one's own clips;
# admin: delete anyone's clips.
Scope = Literal["read", "write", "admin"]


class ApiKey(BaseModel):
    """One configured key: who it is, the hash of the secret, and what it may do."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    scopes: set[Scope] = Field(default_factory=lambda: {"read"})


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key() -> str:
    return "dm_" + secrets.token_urlsafe(32)
