"""Clip records and their files: a manifest database plus content-addressed safetensors.

The manifest is the SQLite file below or, with ``database_url``, a PostgreSQL database
(``memory_bank.manifest`` defines the schema once and migrates it). Layout of a bank directory::

    manifest.sqlite3                      clips, tags, change log (the source of truth; SQLite)
    latents/ab/<hash>.safetensors         canonical VAE latent (optional)
    sources/ab/<hash><ext>                uploaded file (optional)
    index/                                indexes: materialised views of the manifest
    tmp/                                  partial writes; emptied on open

A clip's memory tokens (a few KB per encoder version) and poster frame live in the manifest
itself, written in the same transaction as its row and change-log entry. Files (latents and
sources) are written to ``tmp/`` and renamed into place before that transaction. A crash at any
point leaves at worst unreferenced files, which :meth:`ClipStore.collect_garbage` removes; a row
never points at a missing file.
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import sqlalchemy as sa
import torch
from safetensors.torch import load, save

from memory_bank import manifest
from memory_bank.errors import BankCorrupt, ClipNotFound, DuplicateClip
from memory_bank.manifest import changes, clip_posters, clip_tags, clip_tokens, clips, meta
from memory_bank.schemas import ClipPage, ClipRecord
from memory_bank.storage import LocalStorage, ObjectMissing, ObjectStorage
from model.atomic import atomic_path
from model.tokens import ClipTokens

# What a ClipRecord is made of, in its field order.
RECORD_COLUMNS = (
    clips.c.clip_id, clips.c.caption, clips.c.source_name, clips.c.content_hash,
    clips.c.duration_s, clips.c.fps, clips.c.num_frames, clips.c.width, clips.c.height,
    clips.c.size_bytes, clips.c.created_at, clips.c.encoder_version, clips.c.owner,
)  # fmt: skip
MAX_ID = 2**63 - 1


@dataclass(frozen=True)
class NewClip:
    """Everything ingest knows about a clip before it has an id."""

    caption: str
    source_name: str
    content_hash: str
    duration_s: float
    fps: float
    num_frames: int
    width: int
    height: int
    size_bytes: int
    tags: tuple[str, ...]
    embedder: str
    text_embedding: np.ndarray  # (dim,) float32, unit norm
    visual_embedder: str | None = None
    visual_embedding: np.ndarray | None = None  # (dim,) float32, unit norm, keyframes' mean
    owner: str | None = None  # who added it (an API key's name); None: the operator


@dataclass(frozen=True)
class ClipRow:
    """A clip as the manifest stores it: metadata and embeddings plus its small payloads."""

    clip: NewClip
    tokens: ClipTokens  # (1, U, F)
    encoder_version: str
    poster_jpeg: bytes
    has_latent: bool
    source_ext: str | None


def _clip_values(row: ClipRow) -> dict[str, Any]:
    clip = row.clip
    return dict(
        caption=clip.caption, source_name=clip.source_name, content_hash=clip.content_hash,
        duration_s=clip.duration_s, fps=clip.fps, num_frames=clip.num_frames,
        width=clip.width, height=clip.height, size_bytes=clip.size_bytes,
        created_at=datetime.now(timezone.utc).isoformat(), encoder_version=row.encoder_version,
        has_latent=bool(row.has_latent), source_ext=row.source_ext, embedder=clip.embedder,
        text_embedding=_vector_bytes(clip.text_embedding),
        visual_embedder=clip.visual_embedder,
        visual_embedding=(
            None if clip.visual_embedding is None else _vector_bytes(clip.visual_embedding)
        ),
        owner=clip.owner,
    )  # fmt: skip


@dataclass(frozen=True)
class Change:
    seq: int
    clip_id: int
    op: str


# Partial or unreferenced files younger than this may belong to a live ingest elsewhere.
STALE_AFTER_S = 3600.0


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except FileNotFoundError:
        return False


def _shard(content_hash: str) -> str:
    return f"{content_hash[:2]}/{content_hash}"


class ClipStore:
    """Manifest and files of one bank. Thread-safe; safe to share between processes and hosts
    (the manifest on PostgreSQL)."""

    def __init__(
        self,
        root: str | Path,
        database_url: str | None = None,
        files: ObjectStorage | None = None,
    ) -> None:
        self.root = Path(root)
        # Latents and sources: the bank folder itself, or a bucket every host reaches.
        self.files = files if files is not None else LocalStorage(self.root)
        for folder in ("index", "tmp"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self._clear_tmp()
        url = manifest.database_url(self.root, database_url)
        self._writer, self._reader = manifest.create_engines(url)
        self._postgres = url.get_backend_name() == "postgresql"
        manifest.upgrade(self._writer)
        self._adopt_file_payloads()

    # -- plumbing ----------------------------------------------------------------------------------

    def _clear_tmp(self) -> None:
        for leftover in (self.root / "tmp").iterdir():
            if leftover.is_file() and _older_than(leftover, STALE_AFTER_S):
                leftover.unlink(missing_ok=True)

    @contextmanager
    def _transaction(self, *, logs_changes: bool = False) -> Iterator[sa.Connection]:
        """One write transaction; ``logs_changes``: it appends to the change log."""
        with self._writer.begin() as connection:
            if logs_changes and self._postgres:
                # Writers of the log one at a time, so entries become visible in seq order.
                connection.execute(
                    sa.select(sa.func.pg_advisory_xact_lock(manifest.CHANGE_LOG_LOCK))
                )
            yield connection

    @manifest.reconnecting
    def _query(self, statement: sa.Executable) -> list[sa.Row]:
        with self._reader.connect() as connection:
            return list(connection.execute(statement))

    @manifest.reconnecting
    def _scalar(self, statement: sa.Executable) -> Any:
        with self._reader.connect() as connection:
            return connection.execute(statement).scalar()

    def close(self) -> None:
        self._writer.dispose()
        self._reader.dispose()

    def snapshot_lock(self) -> SnapshotLock:
        """The lock that lets one process at a time write index snapshots of this bank."""
        if self._postgres:
            return _PostgresSnapshotLock(self._writer)
        return _FileSnapshotLock(self.root / "index" / ".snapshots.lock")

    def meta(self, key: str) -> str | None:
        return self._scalar(sa.select(meta.c.value).where(meta.c.key == key))

    @manifest.reconnecting
    def set_meta(self, key: str, value: str) -> None:
        with self._transaction() as db:
            db.execute(sa.delete(meta).where(meta.c.key == key))
            db.execute(sa.insert(meta).values(key=key, value=value))

    def write_atomically(self, target: Path, write) -> Path:
        """Write a local file (the index's) through ``tmp/`` and rename: absent or complete."""
        with atomic_path(target, tmp_dir=self.root / "tmp", durable=True) as temporary:
            write(temporary)
        return target

    # -- files: latents and sources, in ``files`` ---------------------------------------------

    @staticmethod
    def latent_key(content_hash: str) -> str:
        return f"latents/{_shard(content_hash)}.safetensors"

    @staticmethod
    def source_key(content_hash: str, ext: str) -> str:
        return f"sources/{_shard(content_hash)}{ext}"

    def put_latent(self, content_hash: str, latent: torch.Tensor) -> None:
        tensors = {"latent": latent.detach().to(torch.bfloat16).cpu().contiguous()}
        self.files.put_bytes(self.latent_key(content_hash), save(tensors))

    def put_source(self, content_hash: str, ext: str, source: Path) -> None:
        self.files.put_file(self.source_key(content_hash, ext), source)

    def read_latent(self, content_hash: str) -> torch.Tensor:
        """Raises :class:`~memory_bank.storage.ObjectMissing` when the file is gone."""
        return load(self.files.get_bytes(self.latent_key(content_hash)))["latent"].float()

    def source_copy(self, content_hash: str, ext: str) -> AbstractContextManager[Path]:
        """A local file of the clip's source for the duration of a ``with`` block."""
        return self.files.local_copy(self.source_key(content_hash, ext))

    # -- records -----------------------------------------------------------------------------------

    def insert(
        self,
        clip: NewClip,
        *,
        tokens: ClipTokens,
        encoder_version: str,
        poster_jpeg: bytes,
        has_latent: bool,
        source_ext: str | None,
    ) -> ClipRecord:
        """Add one clip (see :meth:`insert_many`).

        Raises:
            DuplicateClip: a clip with the same content hash is already in the manifest.
        """
        row = ClipRow(clip, tokens, encoder_version, poster_jpeg, has_latent, source_ext)
        [(record, created)] = self.insert_many([row])
        if not created:
            raise DuplicateClip(f"clip {clip.content_hash} is already in the bank")
        return record

    @manifest.reconnecting
    def insert_many(self, rows: Sequence[ClipRow]) -> list[tuple[ClipRecord, bool]]:
        """Add clip rows with their tags, tokens and posters (their files must already be in
        place) and log the changes, all in one transaction: a bulk import pays one commit per
        batch, not per clip.

        Returns ``(record, created)`` per row, in order; ``created`` is False for a row whose
        content hash the manifest (or an earlier row of the batch) already holds, and the
        record is then that clip's.
        """
        if not rows:
            return []
        hashes = [row.clip.content_hash for row in rows]
        # The first row of each hash not yet stored is a new clip; every other row is not.
        first_of_hash: dict[str, int] = {}
        for i, content_hash in enumerate(hashes):
            first_of_hash.setdefault(content_hash, i)
        try:
            with self._transaction(logs_changes=True) as db:
                # Writers that log changes are serialised (BEGIN IMMEDIATE on SQLite, the
                # change-log lock on PostgreSQL), so what this reads stays true until commit.
                ids: dict[str, int] = dict(
                    db.execute(
                        sa.select(clips.c.content_hash, clips.c.clip_id).where(
                            clips.c.content_hash.in_(first_of_hash)
                        )
                    ).all()
                )
                new_rows = [i for h, i in first_of_hash.items() if h not in ids]
                fresh = [rows[i] for i in new_rows]
                if fresh:
                    new_ids = (
                        db.execute(
                            sa.insert(clips).returning(
                                clips.c.clip_id, sort_by_parameter_order=True
                            ),
                            [_clip_values(row) for row in fresh],
                        )
                        .scalars()
                        .all()
                    )
                    self._insert_payloads(db, fresh, new_ids)
                    ids.update(
                        (row.clip.content_hash, clip_id)
                        for row, clip_id in zip(fresh, new_ids, strict=True)
                    )
        except sa.exc.IntegrityError as error:
            raise BankCorrupt(f"manifest refused a clip: {error.orig}") from error
        records = self.find_many(list(ids.values()))
        gone = [h for h in hashes if ids[h] not in records]
        if gone:  # a clip this batch found stored was deleted again since
            raise ClipNotFound(f"clip {gone[0]} was deleted while being added again")
        created = set(new_rows)
        return [(records[ids[h]], i in created) for i, h in enumerate(hashes)]

    @staticmethod
    def _insert_payloads(db: sa.Connection, rows: Sequence[ClipRow], ids: Sequence[int]) -> None:
        """The rows that go with new clips: tags, tokens, poster, change-log entry."""
        tag_rows = [
            {"clip_id": clip_id, "tag": tag}
            for row, clip_id in zip(rows, ids, strict=True)
            for tag in dict.fromkeys(row.clip.tags)
        ]
        if tag_rows:
            db.execute(sa.insert(clip_tags), tag_rows)
        db.execute(
            sa.insert(clip_tokens),
            [
                {"clip_id": clip_id, "encoder_version": row.encoder_version,
                 "data": _tokens_bytes(row.tokens)}
                for row, clip_id in zip(rows, ids, strict=True)
            ],
        )  # fmt: skip
        db.execute(
            sa.insert(clip_posters),
            [
                {"clip_id": clip_id, "jpeg": row.poster_jpeg}
                for row, clip_id in zip(rows, ids, strict=True)
            ],
        )
        db.execute(sa.insert(changes), [{"clip_id": clip_id, "op": "add"} for clip_id in ids])

    def find_by_hash(self, content_hash: str) -> ClipRecord | None:
        rows = self._query(sa.select(*RECORD_COLUMNS).where(clips.c.content_hash == content_hash))
        return self._records(rows)[0] if rows else None

    def known_hashes(self, content_hashes: Sequence[str]) -> set[str]:
        """Which of these content hashes the manifest holds, in one query."""
        if not content_hashes:
            return set()
        rows = self._query(
            sa.select(clips.c.content_hash).where(clips.c.content_hash.in_(set(content_hashes)))
        )
        return {row[0] for row in rows}

    def find_by_id(self, clip_id: int) -> ClipRecord | None:
        if not 0 < clip_id <= MAX_ID:
            return None
        rows = self._query(sa.select(*RECORD_COLUMNS).where(clips.c.clip_id == clip_id))
        return self._records(rows)[0] if rows else None

    def get(self, clip_id: int) -> ClipRecord:
        record = self.find_by_id(clip_id)
        if record is None:
            raise ClipNotFound(f"no clip with id {clip_id}")
        return record

    def find_many(self, clip_ids: list[int]) -> dict[int, ClipRecord]:
        """Records of the ids that exist, by id, in one query."""
        valid = [i for i in clip_ids if 0 < i <= MAX_ID]
        if not valid:
            return {}
        rows = self._query(sa.select(*RECORD_COLUMNS).where(clips.c.clip_id.in_(valid)))
        return {record.clip_id: record for record in self._records(rows)}

    def captions(self, clip_ids: list[int]) -> dict[int, str]:
        """Captions of the ids that exist, in one query (all a search hit shows)."""
        valid = [i for i in clip_ids if 0 < i <= MAX_ID]
        if not valid:
            return {}
        rows = self._query(
            sa.select(clips.c.clip_id, clips.c.caption).where(clips.c.clip_id.in_(valid))
        )
        return dict(rows)

    def get_many(self, clip_ids: list[int]) -> list[ClipRecord]:
        """Records in the order of ``clip_ids``; unknown ids raise :class:`ClipNotFound`."""
        by_id = self.find_many(clip_ids)
        missing = [clip_id for clip_id in clip_ids if clip_id not in by_id]
        if missing:
            raise ClipNotFound(f"no clip with id {', '.join(map(str, missing))}")
        return [by_id[clip_id] for clip_id in clip_ids]

    def list(
        self, *, before: int | None = None, limit: int = 50, tag: str | None = None
    ) -> ClipPage:
        """Up to ``limit`` clips with ids below ``before``, newest first.

        Keyset pagination: each page is one index range scan, as fast at the millionth clip as
        at the first, and no page counts the table.
        """
        if tag is None:
            ids = sa.select(clips.c.clip_id)
            id_column = clips.c.clip_id
        else:
            # From the (tag, clip_id) index: a rare tag never scans the whole clips table.
            ids = sa.select(clip_tags.c.clip_id).where(clip_tags.c.tag == tag)
            id_column = clip_tags.c.clip_id
        if before is not None:
            ids = ids.where(id_column < before)
        page_ids = [row[0] for row in self._query(ids.order_by(id_column.desc()).limit(limit + 1))]
        more = len(page_ids) > limit
        page_ids = page_ids[:limit]
        by_id = self.find_many(page_ids)
        items = [by_id[clip_id] for clip_id in page_ids if clip_id in by_id]
        return ClipPage(items=items, next_cursor=page_ids[-1] if more else None, limit=limit)

    def count(self, tag: str | None = None) -> int:
        if tag is None:
            return self._scalar(sa.select(sa.func.count()).select_from(clips))
        return self._scalar(
            sa.select(sa.func.count()).select_from(clip_tags).where(clip_tags.c.tag == tag)
        )

    @manifest.reconnecting
    def delete(self, clip_id: int) -> ClipRecord:
        """Remove the row (and log it), then its files; returns the deleted record."""
        record = self.get(clip_id)
        content_hash, has_latent, source_ext = self.storage_of(clip_id)
        with self._transaction(logs_changes=True) as db:
            # Dependent rows go explicitly: foreign-key cascades are off in some SQLite builds.
            for table in (clip_tags, clip_tokens, clip_posters):
                db.execute(sa.delete(table).where(table.c.clip_id == clip_id))
            deleted = db.execute(sa.delete(clips).where(clips.c.clip_id == clip_id)).rowcount
            if not deleted:
                raise ClipNotFound(f"no clip with id {clip_id}")
            db.execute(sa.insert(changes).values(clip_id=clip_id, op="delete"))
        # Files go after the row: a crash here leaves unreferenced files, never a dangling row.
        self._remove_files(content_hash, has_latent=has_latent, source_ext=source_ext)
        return record

    def _remove_files(self, content_hash: str, *, has_latent: bool, source_ext: str | None) -> None:
        if has_latent:
            self.files.delete(self.latent_key(content_hash))
        if source_ext:
            self.files.delete(self.source_key(content_hash, source_ext))

    # -- small payloads: tokens and posters ----------------------------------------------------

    def tokens_of(self, clip_ids: list[int], encoder_version: str) -> dict[int, ClipTokens]:
        """Cached tokens ``(1, U, F)`` of those clips that have them for ``encoder_version``."""
        if not clip_ids:
            return {}
        rows = self._query(
            sa.select(clip_tokens.c.clip_id, clip_tokens.c.data).where(
                clip_tokens.c.clip_id.in_(clip_ids),
                clip_tokens.c.encoder_version == encoder_version,
            )
        )
        return {clip_id: _tokens_from_bytes(data) for clip_id, data in rows}

    @manifest.reconnecting
    def set_tokens(self, clip_id: int, encoder_version: str, tokens: ClipTokens) -> None:
        """Store the clip's tokens for ``encoder_version`` and make that version current."""
        data = _tokens_bytes(tokens)
        version = clip_tokens.c.encoder_version
        key = (clip_tokens.c.clip_id == clip_id) & (version == encoder_version)
        with self._transaction() as db:
            current = sa.update(clips).where(clips.c.clip_id == clip_id)
            if not db.execute(current.values(encoder_version=encoder_version)).rowcount:
                raise ClipNotFound(f"no clip with id {clip_id}")
            db.execute(sa.delete(clip_tokens).where(key))
            db.execute(
                sa.insert(clip_tokens).values(
                    clip_id=clip_id, encoder_version=encoder_version, data=data
                )
            )

    def poster_jpeg(self, clip_id: int) -> bytes | None:
        return self._scalar(sa.select(clip_posters.c.jpeg).where(clip_posters.c.clip_id == clip_id))

    def _adopt_file_payloads(self) -> None:
        """Read the token and poster files of a bank made before they moved into the manifest.

        Runs on every open but costs one directory listing once the folders are gone; a crash
        half-way simply adopts the rest next time (rows already adopted are kept).
        """
        tokens_dir, posters_dir = self.root / "tokens", self.root / "posters"
        if not tokens_dir.is_dir() and not posters_dir.is_dir():
            return
        by_hash = {
            row.content_hash: row.clip_id
            for row in self._query(sa.select(clips.c.clip_id, clips.c.content_hash))
        }
        for path in sorted(tokens_dir.glob("*/*/*.safetensors")):
            clip_id = by_hash.get(path.name.removesuffix(".safetensors"))
            version = path.parent.parent.name
            if clip_id is not None:
                with self._transaction() as db:
                    exists = db.execute(
                        sa.select(clip_tokens.c.clip_id).where(
                            clip_tokens.c.clip_id == clip_id,
                            clip_tokens.c.encoder_version == version,
                        )
                    ).first()
                    if exists is None:
                        db.execute(
                            sa.insert(clip_tokens).values(
                                clip_id=clip_id, encoder_version=version, data=path.read_bytes()
                            )
                        )
            path.unlink()
        for path in sorted(posters_dir.glob("*/*.jpg")):
            clip_id = by_hash.get(path.stem)
            if clip_id is not None and self.poster_jpeg(clip_id) is None:
                with self._transaction() as db:
                    db.execute(
                        sa.insert(clip_posters).values(clip_id=clip_id, jpeg=path.read_bytes())
                    )
            path.unlink()
        for folder in (tokens_dir, posters_dir):
            shutil.rmtree(folder, ignore_errors=True)

    def stale_clips(self, encoder_version: str) -> list[int]:
        """Ids of clips whose cached tokens were made by another encoder version."""
        version = clips.c.encoder_version
        # Three ranges of the encoder_version index ("!=" or an OR would scan every clip).
        ranges = [version.is_(None), version < encoder_version, version > encoder_version]
        rows = self._query(sa.union_all(*(sa.select(clips.c.clip_id).where(r) for r in ranges)))
        return sorted(row[0] for row in rows)

    def storage_of(self, clip_id: int) -> tuple[str, bool, str | None]:
        """``(content_hash, has_latent, source_ext)`` of a clip."""
        rows = self._query(
            sa.select(clips.c.content_hash, clips.c.has_latent, clips.c.source_ext).where(
                clips.c.clip_id == clip_id
            )
        )
        if not rows:
            raise ClipNotFound(f"no clip with id {clip_id}")
        content_hash, has_latent, source_ext = rows[0]
        return content_hash, bool(has_latent), source_ext

    def _records(self, rows: list[sa.Row]) -> list[ClipRecord]:
        if not rows:
            return []
        ids = [row.clip_id for row in rows]
        tags: dict[int, list[str]] = {}
        for clip_id, tag in self._query(
            sa.select(clip_tags.c.clip_id, clip_tags.c.tag)
            .where(clip_tags.c.clip_id.in_(ids))
            .order_by(clip_tags.c.tag)
        ):
            tags.setdefault(clip_id, []).append(tag)
        return [ClipRecord(**row._asdict(), tags=tags.get(row.clip_id, [])) for row in rows]

    # -- what indexes are built from ---------------------------------------------------------------

    def embeddings(
        self, clip_ids: list[int] | None = None, kind: str = "text"
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int64 (n,), vectors float32 (n, dim))`` of the given (or all) clips.

        ``kind`` is ``"text"`` (caption) or ``"visual"`` (keyframes); clips without a vector of
        that kind are left out.
        """
        column = {"text": clips.c.text_embedding, "visual": clips.c.visual_embedding}[kind]
        query = sa.select(clips.c.clip_id, column).where(column.is_not(None))
        if clip_ids is None:
            query = query.order_by(clips.c.clip_id)
        else:
            query = query.where(clips.c.clip_id.in_(clip_ids))
        rows = self._query(query)
        ids = np.array([row[0] for row in rows], dtype=np.int64)
        if not rows:
            return ids, np.zeros((0, 0), dtype=np.float32)
        vectors = np.stack([np.frombuffer(row[1], dtype=np.float32) for row in rows])
        return ids, vectors

    def embedders(self, kind: str = "text") -> set[str]:
        """The models that vectors of this kind were made with.

        A skip scan of the column's index: one seek per distinct value (``MIN`` of the values
        above the last one found), so a bank of a million clips answers in a few queries.
        """
        column = {"text": clips.c.embedder, "visual": clips.c.visual_embedder}[kind]
        found: set[str] = set()
        query = sa.select(sa.func.min(column)).where(column.is_not(None))
        while (value := self._scalar(query)) is not None:
            found.add(value)
            query = sa.select(sa.func.min(column)).where(column > value)
        return found

    def last_change(self) -> int:
        return int(self._scalar(sa.select(sa.func.coalesce(sa.func.max(changes.c.seq), 0))))

    def changes_since(self, seq: int) -> list[Change]:
        rows = self._query(
            sa.select(changes.c.seq, changes.c.clip_id, changes.c.op)
            .where(changes.c.seq > seq)
            .order_by(changes.c.seq)
        )
        return [Change(*row) for row in rows]

    def referenced_hashes(self) -> set[str]:
        return {row[0] for row in self._query(sa.select(clips.c.content_hash))}

    def collect_garbage(self, min_age_s: float = STALE_AFTER_S) -> int:
        """Delete files no manifest row references (left by a crash); returns how many.

        Only files older than ``min_age_s``: a younger one may belong to an ingest in another
        process that has written its files but not yet its row.
        """
        referenced = self.referenced_hashes()
        removed = 0
        now = time.time()
        for folder in ("latents/", "sources/"):
            for key in list(self.files.keys(folder)):
                content_hash = key.rsplit("/", 1)[-1].split(".")[0]
                if content_hash in referenced:
                    continue
                try:
                    old = now - self.files.modified_at(key) > min_age_s
                except ObjectMissing:
                    continue
                if old:
                    self.files.delete(key)
                    removed += 1
        return removed


class SnapshotLock(Protocol):
    """Held by at most one process per bank; a process that dies releases it."""

    def try_acquire(self) -> bool:
        """Whether this process holds the lock now (taking it if it is free)."""
        ...

    def release(self) -> None: ...


class _FileSnapshotLock:
    """One host (SQLite): an exclusive ``flock`` on a file in the bank's index folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = None

    def try_acquire(self) -> bool:
        if self._handle is not None:
            return True
        handle = open(self.path, "a+b")  # noqa: SIM115 - held open while the lock is held
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._handle = handle
        return True

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file releases the flock
            self._handle = None


class _PostgresSnapshotLock:
    """A fleet (PostgreSQL): a session-level advisory lock on a connection of its own, so the
    lock ends with the process or its connection, whichever goes first."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._connection: sa.Connection | None = None

    def try_acquire(self) -> bool:
        if self._connection is not None:
            try:  # still ours only if the connection that took it is alive
                self._connection.execute(sa.text("SELECT 1"))
                self._connection.commit()
                return True
            except sa.exc.DBAPIError:
                self.release()
        try:
            connection = self.engine.connect()
            held = connection.execute(
                sa.select(sa.func.pg_try_advisory_lock(manifest.SNAPSHOT_LOCK))
            ).scalar()
            connection.commit()
        except sa.exc.DBAPIError:
            return False
        if not held:
            connection.close()
            return False
        self._connection = connection
        return True

    def release(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(sa.exc.DBAPIError):
                # Invalidated first: a connection back in the pool would keep the lock.
                self._connection.invalidate()
                self._connection.close()
            self._connection = None


def _vector_bytes(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=np.float32).tobytes()


def _tokens_bytes(tokens: ClipTokens) -> bytes:
    """One clip's distinct tokens ``(1, U, F)`` as safetensors bytes, in bf16 (a few KB)."""
    if tokens.num_clips != 1:
        raise ValueError("store the tokens of one clip at a time")
    return save(
        {
            "high": tokens.high[0].detach().to(torch.bfloat16).cpu().contiguous(),
            "low": tokens.low[0].detach().to(torch.bfloat16).cpu().contiguous(),
            "counts": tokens.counts.detach().cpu().contiguous(),
        }
    )


def _tokens_from_bytes(data: bytes) -> ClipTokens:
    tensors = load(data)
    return ClipTokens(
        tensors["high"].unsqueeze(0).float(), tensors["low"].unsqueeze(0).float(), tensors["counts"]
    )
