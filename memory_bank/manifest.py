"""The bank's manifest database: one schema definition, engines for SQLite and PostgreSQL, and
Alembic migrations that bring any bank up to date when it is opened.

* SQLite (the default, ``manifest.sqlite3`` in the bank folder): WAL journal, writes in
  ``BEGIN IMMEDIATE`` transactions so two processes never interleave a read-modify-write, reads
  on a small pool of their own connections so they never queue behind each other.
* PostgreSQL (``DITMEM_DATABASE_URL=postgresql://...``, psycopg 3): the manifest every host of a
  fleet shares. Connections are checked before use, so a restarted server or a terminated
  backend costs one reconnect, not a process restart.

The change log (``changes``) is what keeps every process's FAISS index in step: each process
replays the entries past the position it has applied. That is only correct if entries become
visible in ``seq`` order. SQLite has one writer at a time, so they do; on PostgreSQL two
transactions may commit out of sequence order, so every write that logs a change first takes a
transaction-scoped advisory lock (:data:`CHANGE_LOG_LOCK`), which serialises the writers.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url

from memory_bank.errors import BankCorrupt

if TYPE_CHECKING:
    from alembic.config import Config

P = ParamSpec("P")
T = TypeVar("T")
logger = logging.getLogger(__name__)

metadata = sa.MetaData()

# SQLite keeps INTEGER PRIMARY KEY as the rowid alias (what banks of earlier releases have);
# PostgreSQL gets 64-bit ids.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

clips = sa.Table(
    "clips",
    metadata,
    sa.Column("clip_id", BigId, primary_key=True, autoincrement=True),
    sa.Column("caption", sa.Text, nullable=False),
    sa.Column("source_name", sa.Text, nullable=False),
    sa.Column("content_hash", sa.Text, nullable=False, unique=True),
    sa.Column("duration_s", sa.Float, nullable=False),
    sa.Column("fps", sa.Float, nullable=False),
    sa.Column("num_frames", sa.Integer, nullable=False),
    sa.Column("width", sa.Integer, nullable=False),
    sa.Column("height", sa.Integer, nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    # ISO 8601 text, as banks of earlier releases store it: portable, sorts by time.
    sa.Column("created_at", sa.Text, nullable=False),
    sa.Column("encoder_version", sa.Text),
    sa.Column("has_latent", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("source_ext", sa.Text),
    sa.Column("embedder", sa.Text, nullable=False),
    sa.Column("text_embedding", sa.LargeBinary, nullable=False),
    sa.Column("visual_embedder", sa.Text),
    sa.Column("visual_embedding", sa.LargeBinary),
    # Who added the clip (an API key's name); None: the operator (CLI) or a bank made before.
    sa.Column("owner", sa.Text),
    # Opening a bank asks for embedders other than its own, a worker for clips of another
    # encoder: answered from these, never by scanning a million rows (migration 0003).
    sa.Index("clips_by_embedder", "embedder"),
    sa.Index("clips_by_visual_embedder", "visual_embedder"),
    sa.Index("clips_by_encoder_version", "encoder_version"),
    sqlite_autoincrement=True,  # ids of deleted clips are never handed out again
)


def _clip_key() -> sa.Column:
    """The ``clip_id`` (part of the primary key) of a table of per-clip rows."""
    return sa.Column(
        "clip_id", BigId, sa.ForeignKey("clips.clip_id", ondelete="CASCADE"), primary_key=True
    )


clip_tags = sa.Table(
    "clip_tags",
    metadata,
    _clip_key(),
    sa.Column("tag", sa.Text, primary_key=True),
    sa.Index("clip_tags_by_tag", "tag", "clip_id"),
)

changes = sa.Table(
    "changes",
    metadata,
    sa.Column("seq", BigId, primary_key=True, autoincrement=True),
    sa.Column("clip_id", sa.BigInteger, nullable=False),
    sa.Column("op", sa.Text, sa.CheckConstraint("op IN ('add', 'delete')"), nullable=False),
    sqlite_autoincrement=True,
)

# A clip's small payloads live in the manifest rather than as files: one query fetches the
# tokens of a request's k clips on any host, they commit atomically with the clip's row, and a
# bank holds no millions of tiny files (docs/benchmarks.md, "Where a clip's small files go").
clip_tokens = sa.Table(
    "clip_tokens",
    metadata,
    _clip_key(),
    sa.Column("encoder_version", sa.Text, primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),  # safetensors: high, low, counts (bf16)
)

clip_posters = sa.Table(
    "clip_posters",
    metadata,
    _clip_key(),
    sa.Column("jpeg", sa.LargeBinary, nullable=False),
)

meta = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

# Keys of PostgreSQL advisory locks (any fixed 64-bit numbers): one orders change-log writers,
# one elects the process that writes index snapshots.
CHANGE_LOG_LOCK = 0x6469746D656D  # "ditmem"
SNAPSHOT_LOCK = CHANGE_LOG_LOCK + 2

MIGRATIONS = Path(__file__).with_name("migrations")
# The revision that is exactly the schema of banks made before migrations existed.
BASELINE_REVISION = "0001"


def database_url(root: Path, url: str | None) -> URL:
    """The manifest's SQLAlchemy URL: ``url`` (PostgreSQL through psycopg 3) or the bank file."""
    if url is None:
        return URL.create("sqlite", database=str(Path(root) / "manifest.sqlite3"))
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError:
        raise BankCorrupt(f"manifest database URL {url!r} is not a database URL") from None
    if parsed.get_backend_name() == "postgresql":
        return parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        return parsed
    raise BankCorrupt(f"unsupported manifest database {parsed.get_backend_name()!r}")


def _sqlite_engine(url: URL, *, immediate: bool) -> Engine:
    engine = sa.create_engine(url, connect_args={"timeout": 30.0, "check_same_thread": False})

    @sa.event.listens_for(engine, "connect")
    def _configure(dbapi_connection, _record) -> None:
        # Transactions are begun below, by us, not by the driver's own heuristics.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def create_engines(url: URL) -> tuple[Engine, Engine]:
    """``(writer, reader)`` engines. They are the same engine on PostgreSQL."""
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url, immediate=True), _sqlite_engine(url, immediate=False)
    engine = sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
    return engine, engine


def _alembic_config(connection: sa.Connection) -> Config:
    # Imported here: settings validate URLs with this module, and need no migration machinery.
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


RECONNECT_ATTEMPTS = 3


def reconnecting(operation: Callable[P, T]) -> Callable[P, T]:
    """Run ``operation`` again on a fresh connection when the database dropped ours (a restarted
    server, a terminated backend, a failover).

    Every manifest operation is a single transaction, so a dropped one either committed or left
    nothing behind; re-running it is safe (an insert that did commit comes back a duplicate).
    """

    @functools.wraps(operation)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        for attempt in range(RECONNECT_ATTEMPTS):
            try:
                return operation(*args, **kwargs)
            except sa.exc.DBAPIError as error:
                if not error.connection_invalidated or attempt == RECONNECT_ATTEMPTS - 1:
                    raise
                logger.warning("manifest connection lost (%s); retrying", error.orig)
                time.sleep(0.1 * 2**attempt)
        raise AssertionError("unreachable")

    return run


@reconnecting
def upgrade(engine: Engine) -> None:
    """Bring the manifest to the newest schema; a bank of an earlier release is upgraded in
    place (it holds the baseline schema without Alembic's version table, so it is stamped)."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            # Two processes opening a new database at once must not both create the tables.
            connection.execute(sa.select(sa.func.pg_advisory_xact_lock(CHANGE_LOG_LOCK + 1)))
        config = _alembic_config(connection)
        current = MigrationContext.configure(connection).get_current_revision()
        inspector = sa.inspect(connection)
        if current is None and inspector.has_table("clips"):
            command.stamp(config, BASELINE_REVISION)
        command.upgrade(config, "head")
