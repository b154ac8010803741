"""Idempotent submission: the same ``Idempotency-Key`` with the same request returns the job it
made the first time, for 24 hours, instead of queueing a second video on a GPU.

A key is scoped to its API key. The first request reserves it atomically (Redis ``SET NX``, or
a lock in embedded mode) together with a fingerprint of its body, makes its job, then records
the job id under the key. A concurrent duplicate finds the reservation and waits the moment
that takes; one with another body under the same key is refused. A request that fails before
its job exists releases the key, so retrying it can succeed.
"""

from __future__ import annotations

import json
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import redis

IDEMPOTENCY_TTL_S = 24 * 3600
MAX_KEY_CHARS = 255
WAIT_FOR_FIRST_S = 10.0  # how long a concurrent duplicate waits for the first one's job


class IdempotencyConflict(Exception):
    """The key was used with another request body, or its first request is still running."""


@dataclass(frozen=True)
class Claim:
    """``job_id`` is the original job's when the key was used before; ``None``: go ahead."""

    job_id: str | None


def valid_key(key: str) -> bool:
    return 0 < len(key) <= MAX_KEY_CHARS and key.isascii() and key.isprintable()


class IdempotencyKeys(ABC):
    def claim(self, owner: str, key: str, fingerprint: str) -> Claim:
        """Reserve ``key`` for this request, or find the job its first request made.

        Raises:
            IdempotencyConflict: another body used the key, or its first request did not
                finish within ``WAIT_FOR_FIRST_S``.
        """
        deadline = time.monotonic() + WAIT_FOR_FIRST_S
        while True:
            entry = self._reserve(owner, key, fingerprint)
            if entry is None:
                return Claim(None)
            if entry["fingerprint"] != fingerprint:
                raise IdempotencyConflict("this Idempotency-Key was used with another request body")
            if entry.get("job_id"):
                return Claim(entry["job_id"])
            if time.monotonic() > deadline:
                raise IdempotencyConflict("the first request with this key is still running")
            time.sleep(0.01)

    @abstractmethod
    def _reserve(self, owner: str, key: str, fingerprint: str) -> dict | None:
        """Reserve atomically; ``None`` when this call reserved it, else the existing entry."""

    @abstractmethod
    def complete(self, owner: str, key: str, fingerprint: str, job_id: str) -> None:
        """Record the job the reserving request made."""

    @abstractmethod
    def release(self, owner: str, key: str) -> None:
        """Forget a reservation whose request failed before making a job."""


class MemoryIdempotencyKeys(IdempotencyKeys):
    """Embedded mode: keys live as long as the process (and at most the TTL)."""

    def __init__(self, ttl_s: float = IDEMPOTENCY_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[tuple[str, str], tuple[float, dict]] = {}
        self._lock = threading.Lock()

    def _reserve(self, owner: str, key: str, fingerprint: str) -> dict | None:
        now = time.monotonic()
        with self._lock:
            found = self._entries.get((owner, key))
            if found is not None and found[0] > now:
                return dict(found[1])
            self._entries[(owner, key)] = (now + self.ttl_s, {"fingerprint": fingerprint})
            return None

    def complete(self, owner: str, key: str, fingerprint: str, job_id: str) -> None:
        entry = {"fingerprint": fingerprint, "job_id": job_id}
        with self._lock:
            self._entries[(owner, key)] = (time.monotonic() + self.ttl_s, entry)

    def release(self, owner: str, key: str) -> None:
        with self._lock:
            self._entries.pop((owner, key), None)


class RedisIdempotencyKeys(IdempotencyKeys):
    """Keys shared by every API process of a fleet (``<prefix>:v2:idem:<owner>:<key>``)."""

    def __init__(
        self, client: redis.Redis, prefix: str = "ditmem", ttl_s: int = IDEMPOTENCY_TTL_S
    ) -> None:
        self.redis = client
        self.prefix = prefix
        self.ttl_s = ttl_s

    def _key(self, owner: str, key: str) -> str:
        return f"{self.prefix}:v2:idem:{owner}:{key}"

    def _reserve(self, owner: str, key: str, fingerprint: str) -> dict | None:
        name = self._key(owner, key)
        if self.redis.set(name, json.dumps({"fingerprint": fingerprint}), nx=True, ex=self.ttl_s):
            return None
        raw = self.redis.get(name)
        if raw is None:  # expired or released between the two calls: reserve again
            return self._reserve(owner, key, fingerprint)
        return json.loads(raw)

    def complete(self, owner: str, key: str, fingerprint: str, job_id: str) -> None:
        entry = json.dumps({"fingerprint": fingerprint, "job_id": job_id})
        self.redis.set(self._key(owner, key), entry, ex=self.ttl_s)

    def release(self, owner: str, key: str) -> None:
        self.redis.delete(self._key(owner, key))
