"""Clip records and their files: an SQLite manifest (WAL) plus content-addressed safetensors.

Layout of a bank directory::

    manifest.sqlite3                      clips, tags, change log (the source of truth)
    tokens/<encoder_version>/ab/<hash>.safetensors   distinct per-clip memory tokens
    latents/ab/<hash>.safetensors         canonical VAE latent (optional)
    sources/ab/<hash><ext>                uploaded file (optional)
    posters/ab/<hash>.jpg                 a small poster frame for listings
    index/                                indexes: materialised views of the manifest
    tmp/                                  partial writes; emptied on open

Every file is written to ``tmp/`` and renamed into place; the manifest row comes last, in one
transaction with its change-log entry. A crash at any point leaves at worst unreferenced files,
which :meth:`ClipStore.collect_garbage` removes; a row never points at a missing file.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from memory_bank.errors import BankCorrupt, ClipNotFound
from memory_bank.schemas import ClipPage, ClipRecord
from model.atomic import atomic_path
from model.tokens import ClipTokens

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS clips (
    clip_id INTEGER PRIMARY KEY AUTOINCREMENT,
    caption TEXT NOT NULL,
    source_name TEXT NOT NULL,
    content_hash TEXT NOT NULL UNIQUE,
    duration_s REAL NOT NULL,
    fps REAL NOT NULL,
    num_frames INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    encoder_version TEXT,
    has_latent INTEGER NOT NULL DEFAULT 0,
    source_ext TEXT,
    embedder TEXT NOT NULL,
    text_embedding BLOB NOT NULL,
    visual_embedder TEXT,
    visual_embedding BLOB
);
CREATE TABLE IF NOT EXISTS clip_tags (
    clip_id INTEGER NOT NULL REFERENCES clips(clip_id) ON DELETE CASCADE,
    tag TEXT NOT NULL,
    PRIMARY KEY (clip_id, tag)
);
CREATE INDEX IF NOT EXISTS clip_tags_by_tag ON clip_tags(tag, clip_id);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    clip_id INTEGER NOT NULL,
    op TEXT NOT NULL CHECK (op IN ('add', 'delete'))
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

RECORD_COLUMNS = (
    "clip_id, caption, source_name, content_hash, duration_s, fps, num_frames, width, height, "
    "size_bytes, created_at, encoder_version"
)


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
    """Manifest and files of one bank directory. Thread-safe; safe to share between processes."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        for folder in ("tokens", "latents", "sources", "posters", "index", "tmp"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self._clear_tmp()
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            self.root / "manifest.sqlite3", check_same_thread=False, isolation_level=None,
            timeout=30.0,
        )  # fmt: skip
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._transaction() as db:
            for statement in filter(str.strip, SCHEMA.split(";")):
                db.execute(statement)
            db.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
        version = int(self.meta("schema_version"))
        if version != SCHEMA_VERSION:
            raise BankCorrupt(f"bank schema version {version}, this ditmem reads {SCHEMA_VERSION}")

    # -- plumbing ----------------------------------------------------------------------------------

    def _clear_tmp(self) -> None:
        for leftover in (self.root / "tmp").iterdir():
            if leftover.is_file() and _older_than(leftover, STALE_AFTER_S):
                leftover.unlink(missing_ok=True)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def write_atomically(self, target: Path, write) -> Path:
        """Write through ``tmp/`` and rename, so ``target`` is either absent or complete."""
        with atomic_path(target, tmp_dir=self.root / "tmp", durable=True) as temporary:
            write(temporary)
        return target

    # -- files -------------------------------------------------------------------------------------

    def tokens_path(self, content_hash: str, encoder_version: str) -> Path:
        return self.root / "tokens" / encoder_version / f"{_shard(content_hash)}.safetensors"

    def latent_path(self, content_hash: str) -> Path:
        return self.root / "latents" / f"{_shard(content_hash)}.safetensors"

    def source_path(self, content_hash: str, ext: str) -> Path:
        return self.root / "sources" / f"{_shard(content_hash)}{ext}"

    def poster_path(self, content_hash: str) -> Path:
        return self.root / "posters" / f"{_shard(content_hash)}.jpg"

    def put_poster(self, content_hash: str, jpeg: bytes) -> Path:
        path = self.poster_path(content_hash)
        return self.write_atomically(path, lambda tmp: tmp.write_bytes(jpeg))

    def put_tokens(self, content_hash: str, encoder_version: str, tokens: ClipTokens) -> Path:
        """Store one clip's distinct tokens ``(1, U, F)`` in bf16 (a few KB)."""
        if tokens.num_clips != 1:
            raise ValueError("store the tokens of one clip at a time")
        tensors = {
            "high": tokens.high[0].detach().to(torch.bfloat16).cpu().contiguous(),
            "low": tokens.low[0].detach().to(torch.bfloat16).cpu().contiguous(),
            "counts": tokens.counts.detach().cpu().contiguous(),
        }
        path = self.tokens_path(content_hash, encoder_version)
        return self.write_atomically(path, lambda tmp: save_file(tensors, tmp))

    def put_latent(self, content_hash: str, latent: torch.Tensor) -> Path:
        tensors = {"latent": latent.detach().to(torch.bfloat16).cpu().contiguous()}
        path = self.latent_path(content_hash)
        return self.write_atomically(path, lambda tmp: save_file(tensors, tmp))

    def put_source(self, content_hash: str, ext: str, source: Path) -> Path:
        path = self.source_path(content_hash, ext)
        return self.write_atomically(path, lambda tmp: shutil.copyfile(source, tmp))

    def read_tokens(self, content_hash: str, encoder_version: str) -> ClipTokens:
        path = self.tokens_path(content_hash, encoder_version)
        try:
            tensors = load_file(path)
        except FileNotFoundError:
            raise BankCorrupt(
                f"token file {path} is missing; recompute the bank's tokens"
            ) from None
        return ClipTokens(
            tensors["high"].unsqueeze(0).float(),
            tensors["low"].unsqueeze(0).float(),
            tensors["counts"],
        )

    def read_latent(self, content_hash: str) -> torch.Tensor:
        return load_file(self.latent_path(content_hash))["latent"].float()

    # -- records -----------------------------------------------------------------------------------

    def insert(
        self,
        clip: NewClip,
        *,
        encoder_version: str | None,
        has_latent: bool,
        source_ext: str | None,
    ) -> ClipRecord:
        """Add a clip row (its files must already be in place) and log the change."""
        created = datetime.now(timezone.utc).isoformat()
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO clips (caption, source_name, content_hash, duration_s, fps, "
                "num_frames, width, height, size_bytes, created_at, encoder_version, has_latent, "
                "source_ext, embedder, text_embedding, visual_embedder, visual_embedding) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    clip.caption, clip.source_name, clip.content_hash, clip.duration_s, clip.fps,
                    clip.num_frames, clip.width, clip.height, clip.size_bytes, created,
                    encoder_version, int(has_latent), source_ext, clip.embedder,
                    np.asarray(clip.text_embedding, dtype=np.float32).tobytes(),
                    clip.visual_embedder,
                    None
                    if clip.visual_embedding is None
                    else np.asarray(clip.visual_embedding, dtype=np.float32).tobytes(),
                ),
            )  # fmt: skip
            clip_id = int(cursor.lastrowid)
            db.executemany(
                "INSERT OR IGNORE INTO clip_tags (clip_id, tag) VALUES (?, ?)",
                [(clip_id, tag) for tag in clip.tags],
            )
            db.execute("INSERT INTO changes (clip_id, op) VALUES (?, 'add')", (clip_id,))
        return self.get(clip_id)

    def find_by_hash(self, content_hash: str) -> ClipRecord | None:
        rows = self._query(
            f"SELECT {RECORD_COLUMNS} FROM clips WHERE content_hash = ?", (content_hash,)
        )
        return self._records(rows)[0] if rows else None

    def find_by_id(self, clip_id: int) -> ClipRecord | None:
        if not 0 < clip_id < 2**63:
            return None
        rows = self._query(f"SELECT {RECORD_COLUMNS} FROM clips WHERE clip_id = ?", (clip_id,))
        return self._records(rows)[0] if rows else None

    def get(self, clip_id: int) -> ClipRecord:
        record = self.find_by_id(clip_id)
        if record is None:
            raise ClipNotFound(f"no clip with id {clip_id}")
        return record

    def find_many(self, clip_ids: list[int]) -> dict[int, ClipRecord]:
        """Records of the ids that exist, by id, in one query."""
        valid = [i for i in clip_ids if 0 < i < 2**63]
        if not valid:
            return {}
        marks = ",".join("?" * len(valid))
        rows = self._query(
            f"SELECT {RECORD_COLUMNS} FROM clips WHERE clip_id IN ({marks})", tuple(valid)
        )
        return {record.clip_id: record for record in self._records(rows)}

    def get_many(self, clip_ids: list[int]) -> list[ClipRecord]:
        """Records in the order of ``clip_ids``; unknown ids raise :class:`ClipNotFound`."""
        by_id = self.find_many(clip_ids)
        missing = [clip_id for clip_id in clip_ids if clip_id not in by_id]
        if missing:
            raise ClipNotFound(f"no clip with id {', '.join(map(str, missing))}")
        return [by_id[clip_id] for clip_id in clip_ids]

    def list(self, *, offset: int = 0, limit: int = 50, tag: str | None = None) -> ClipPage:
        if tag is None:
            total = self._query("SELECT COUNT(*) FROM clips")[0][0]
            rows = self._query(
                f"SELECT {RECORD_COLUMNS} FROM clips ORDER BY clip_id DESC LIMIT ? OFFSET ?",
                (limit, offset),
            )
        else:
            total = self._query("SELECT COUNT(*) FROM clip_tags WHERE tag = ?", (tag,))[0][0]
            rows = self._query(
                f"SELECT {RECORD_COLUMNS} FROM clips WHERE clip_id IN "
                "(SELECT clip_id FROM clip_tags WHERE tag = ?) "
                "ORDER BY clip_id DESC LIMIT ? OFFSET ?",
                (tag, limit, offset),
            )
        return ClipPage(items=self._records(rows), total=total, offset=offset, limit=limit)

    def count(self) -> int:
        return self._query("SELECT COUNT(*) FROM clips")[0][0]

    def delete(self, clip_id: int) -> ClipRecord:
        """Remove the row (and log it), then its files; returns the deleted record."""
        record = self.get(clip_id)
        storage = self._query(
            "SELECT has_latent, source_ext FROM clips WHERE clip_id = ?", (clip_id,)
        )
        with self._transaction() as db:
            deleted = db.execute("DELETE FROM clips WHERE clip_id = ?", (clip_id,)).rowcount
            if not deleted:
                raise ClipNotFound(f"no clip with id {clip_id}")
            db.execute("INSERT INTO changes (clip_id, op) VALUES (?, 'delete')", (clip_id,))
        # Files go after the row: a crash here leaves unreferenced files, never a dangling row.
        has_latent, source_ext = storage[0]
        self._remove_files(record.content_hash, has_latent=bool(has_latent), source_ext=source_ext)
        return record

    def _remove_files(self, content_hash: str, *, has_latent: bool, source_ext: str | None) -> None:
        for version_dir in (self.root / "tokens").iterdir():
            (version_dir / f"{_shard(content_hash)}.safetensors").unlink(missing_ok=True)
        self.poster_path(content_hash).unlink(missing_ok=True)
        if has_latent:
            self.latent_path(content_hash).unlink(missing_ok=True)
        if source_ext:
            self.source_path(content_hash, source_ext).unlink(missing_ok=True)

    def set_encoder_version(self, clip_id: int, encoder_version: str) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE clips SET encoder_version = ? WHERE clip_id = ?", (encoder_version, clip_id)
            )

    def stale_clips(self, encoder_version: str) -> list[int]:
        """Ids of clips whose cached tokens were made by another encoder version."""
        rows = self._query(
            "SELECT clip_id FROM clips WHERE encoder_version IS NULL OR encoder_version != ? "
            "ORDER BY clip_id",
            (encoder_version,),
        )
        return [row[0] for row in rows]

    def storage_of(self, clip_id: int) -> tuple[str, bool, str | None]:
        """``(content_hash, has_latent, source_ext)`` of a clip."""
        rows = self._query(
            "SELECT content_hash, has_latent, source_ext FROM clips WHERE clip_id = ?", (clip_id,)
        )
        if not rows:
            raise ClipNotFound(f"no clip with id {clip_id}")
        content_hash, has_latent, source_ext = rows[0]
        return content_hash, bool(has_latent), source_ext

    def _records(self, rows: list[tuple]) -> list[ClipRecord]:
        if not rows:
            return []
        ids = [row[0] for row in rows]
        marks = ",".join("?" * len(ids))
        tags: dict[int, list[str]] = {}
        for clip_id, tag in self._query(
            f"SELECT clip_id, tag FROM clip_tags WHERE clip_id IN ({marks}) ORDER BY tag",
            tuple(ids),
        ):
            tags.setdefault(clip_id, []).append(tag)
        fields = [name.strip() for name in RECORD_COLUMNS.split(",")]
        return [
            ClipRecord(**dict(zip(fields, row, strict=True)), tags=tags.get(row[0], []))
            for row in rows
        ]

    # -- what indexes are built from ---------------------------------------------------------------

    def embeddings(
        self, clip_ids: list[int] | None = None, kind: str = "text"
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int64 (n,), vectors float32 (n, dim))`` of the given (or all) clips.

        ``kind`` is ``"text"`` (caption) or ``"visual"`` (keyframes); clips without a vector of
        that kind are left out.
        """
        column = {"text": "text_embedding", "visual": "visual_embedding"}[kind]
        sql = f"SELECT clip_id, {column} FROM clips WHERE {column} IS NOT NULL"
        if clip_ids is None:
            rows = self._query(sql + " ORDER BY clip_id")
        else:
            marks = ",".join("?" * len(clip_ids))
            rows = self._query(sql + f" AND clip_id IN ({marks})", tuple(clip_ids))
        ids = np.array([row[0] for row in rows], dtype=np.int64)
        if not rows:
            return ids, np.zeros((0, 0), dtype=np.float32)
        vectors = np.stack([np.frombuffer(row[1], dtype=np.float32) for row in rows])
        return ids, vectors

    def embedders(self, kind: str = "text") -> set[str]:
        column = {"text": "embedder", "visual": "visual_embedder"}[kind]
        rows = self._query(f"SELECT DISTINCT {column} FROM clips WHERE {column} IS NOT NULL")
        return {row[0] for row in rows}

    def last_change(self) -> int:
        return self._query("SELECT COALESCE(MAX(seq), 0) FROM changes")[0][0]

    def changes_since(self, seq: int) -> list[Change]:
        rows = self._query(
            "SELECT seq, clip_id, op FROM changes WHERE seq > ? ORDER BY seq", (seq,)
        )
        return [Change(*row) for row in rows]

    def referenced_hashes(self) -> set[str]:
        return {row[0] for row in self._query("SELECT content_hash FROM clips")}

    def collect_garbage(self, min_age_s: float = STALE_AFTER_S) -> int:
        """Delete files no manifest row references (left by a crash); returns how many.

        Only files older than ``min_age_s``: a younger one may belong to an ingest in another
        process that has written its files but not yet its row.
        """
        referenced = self.referenced_hashes()
        removed = 0
        for folder in ("tokens", "latents", "sources", "posters"):
            for path in (self.root / folder).rglob("*"):
                if (
                    path.is_file()
                    and path.name.split(".")[0] not in referenced
                    and _older_than(path, min_age_s)
                ):
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed
