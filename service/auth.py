"""API keys: bearer tokens, stored only as SHA-256 hashes in settings, with read/write scopes."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Literal

from pydantic import BaseModel, Field

Scope = Literal["read", "write"]
OPEN_MODE_CALLER = "local"


class ApiKey(BaseModel):
    """One configured key: who it is, the hash of the secret, and what it may do."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    scopes: set[Scope] = Field(default_factory=lambda: {"read"})


class Caller(BaseModel):
    name: str
    scopes: set[Scope]

    def can(self, scope: Scope) -> bool:
        return scope in self.scopes


class AuthError(Exception):
    """Missing or unknown key (401) or a key lacking a scope (403)."""

    def __init__(self, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.status = status


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key() -> str:
    return "dm_" + secrets.token_urlsafe(32)


def authenticate(authorization: str | None, keys: list[ApiKey], open_mode: bool) -> Caller:
    """The caller behind an ``Authorization: Bearer <key>`` header."""
    if open_mode:
        return Caller(name=OPEN_MODE_CALLER, scopes={"read", "write"})
    if not authorization or not authorization.lower().startswith("bearer "):
        raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
    digest = hash_key(authorization[7:].strip())
    for key in keys:
        if hmac.compare_digest(key.sha256, digest):
            return Caller(name=key.name, scopes=key.scopes)
    raise AuthError("unknown API key")
