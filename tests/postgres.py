"""Throwaway PostgreSQL databases on the local server (127.0.0.1:5432, trust auth).

Tests that need PostgreSQL create their own database and drop it afterwards. A server that is
not reachable fails the test with how to start it: it is never skipped.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

ADMIN_URL = os.environ.get("DITMEM_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
START_HINT = "pg_ctlcluster --skip-systemctl-redirect 15 main start"


def _admin() -> psycopg.Connection:
    try:
        return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        pytest.fail(f"PostgreSQL at {ADMIN_URL} is not reachable ({error}); start it: {START_HINT}")


@contextmanager
def temporary_database() -> Iterator[str]:
    """A new empty database; yields its URL and drops it (and its connections) afterwards."""
    name = f"ditmem_test_{uuid.uuid4().hex[:12]}"
    with _admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with _admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def terminate_connections(url: str) -> int:
    """Kill every server backend connected to ``url``'s database (a server-side outage)."""
    database = url.rsplit("/", 1)[1]
    with _admin() as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchall()
    return len(rows)
