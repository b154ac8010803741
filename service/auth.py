"""Who is calling: the bearer key of a request checked against the configured key hashes."""

from __future__ import annotations

import hmac

from pydantic import BaseModel

from runtime.keys import ApiKey, Scope, hash_key

OPEN_MODE_CALLER = "local"


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


def authenticate(authorization: str | None, keys: list[ApiKey], open_mode: bool) -> Caller:
    """The caller behind an ``Authorization: Bearer <key>`` header."""
    if open_mode:
        # One local user, who owns everything there is.
        return Caller(name=OPEN_MODE_CALLER, scopes={"read", "write", "admin"})
    if not authorization or not authorization.lower().startswith("bearer "):
        raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
    digest = hash_key(authorization[7:].strip())
    for key in keys:
        if hmac.compare_digest(key.sha256, digest):
            return Caller(name=key.name, scopes=key.scopes)
    raise AuthError("unknown API key")
