"""``Idempotency-Key`` on the submitting routes (``POST /generate``, ``POST /memory``).

The route computes a fingerprint of what it was asked and makes its job inside
:func:`idempotent_submission`; a replay answers 200 with the original job and
``Idempotent-Replayed: true`` (see ``runtime.idempotency`` for the rules).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import Header, Response

from runtime.idempotency import MAX_KEY_CHARS, IdempotencyConflict, valid_key
from runtime.jobs import JobRecord
from service.auth import Caller
from service.errors import ApiError, JobNotFound
from service.state import AppState

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="Retry-safe submission: the same key and body within 24 h return the first "
        "job (200); another body under the same key is a 409.",
    ),
]


def fingerprint(*parts: Any) -> str:
    """A stable digest of the request (JSON-able parts, or bytes digests already)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class Submission:
    def __init__(self, replayed: JobRecord | None) -> None:
        self.replayed = replayed
        self.job_id: str | None = None

    def made(self, job: JobRecord) -> None:
        self.job_id = job.job_id


@contextmanager
def idempotent_submission(
    state: AppState, caller: Caller, key: str | None, digest: str, response: Response
) -> Iterator[Submission]:
    """Yields the original job when ``key`` was used with this request before (``replayed``);
    otherwise the block makes the job and reports it with :meth:`Submission.made`."""
    if key is None:
        yield Submission(None)
        return
    if not valid_key(key):
        raise ApiError(422, "invalid_idempotency_key",
                       f"Idempotency-Key must be 1-{MAX_KEY_CHARS} printable ASCII characters",
                       [{"field": "Idempotency-Key"}])  # fmt: skip
    keys = state.idempotency
    try:
        claim = keys.claim(caller.name, key, digest)
    except IdempotencyConflict as error:
        raise ApiError(409, "idempotency_conflict", str(error)) from None
    if claim.job_id is not None:
        job = state.store.get(claim.job_id)
        if job is None:
            raise JobNotFound(claim.job_id)
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
        yield Submission(job)
        return
    submission = Submission(None)
    try:
        yield submission
    finally:
        if submission.job_id is None:  # refused or failed before a job existed: retryable
            keys.release(caller.name, key)
        else:
            keys.complete(caller.name, key, digest, submission.job_id)
