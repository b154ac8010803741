"""The memory bank: clip store + caption index, kept in step through the manifest's change log.

The manifest (SQLite) is the source of truth; the FAISS index is a materialised view of it. Each
write appends to a change log in the same transaction as the row, and every bank handle - in
this process or another (API and workers share one bank directory) - brings its in-memory index
up to date by replaying the log before it searches. The index is saved now and then, with the
log position it reflects in its file name, so opening a large bank replays only the tail.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import torch
from pydantic import BaseModel, Field

from memory_bank.embed import TextEmbedder
from memory_bank.errors import BankCorrupt, ClipNotFound
from memory_bank.index import IndexConfig
from memory_bank.schemas import ClipPage, ClipRecord, SearchHit
from memory_bank.storage import ObjectMissing, ObjectStorage
from memory_bank.store import ClipRow, ClipStore, NewClip
from memory_bank.synced_index import SyncedIndex
from model.tokens import ClipTokens

logger = logging.getLogger(__name__)


class VisualEmbedder(Protocol):
    """Keyframe and prompt embeddings in one space (e.g. open_clip); optional."""

    name: str
    dim: int

    def embed_texts(self, texts: list[str]) -> np.ndarray: ...

    def embed_clip(self, path: Path) -> np.ndarray: ...


class BankOptions(BaseModel):
    """How a bank stores clips and indexes them."""

    keep_latents: bool = Field(True, description="store each clip's canonical VAE latent")
    keep_sources: bool = Field(False, description="store the uploaded file itself")
    index: IndexConfig = Field(default_factory=IndexConfig)
    save_index_every: int = Field(
        1000, ge=1, description="snapshot the indexes once this many changes are applied"
    )
    query_cache_size: int = Field(
        4096, ge=0, description="prompt embeddings kept for repeated searches (0: none)"
    )
    snapshot_interval_s: float = Field(
        10.0, gt=0, description="how often the background writer checks for a snapshot due"
    )
    visual_weight: float = Field(
        0.3, ge=0, le=1, description="weight of the visual score when a visual index is on"
    )


class _LruCache:
    """A thread-safe least-recently-used map of prompt -> read-only embedding."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = compute()
        value.setflags(write=False)
        if self.size:
            with self._lock:
                self._items[key] = value
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
        return value


@dataclass(frozen=True)
class ClipToAdd:
    """A clip ready to store: what ingest computed for it."""

    clip: NewClip
    tokens: ClipTokens  # (1, U, F), from the encoder ``encoder_version``
    encoder_version: str  # fingerprint of that encoder
    poster_jpeg: bytes  # a small poster frame for listings
    latent: torch.Tensor | None = None  # canonical VAE latent (C, D, H, W); kept if the bank
    source: Path | None = None  # keeps latents; the uploaded file, kept if it keeps sources


class AddedClip(NamedTuple):
    """What :meth:`MemoryBank.add_clip` stored."""

    record: ClipRecord
    created: bool  # False: a clip with the same content hash was already in the bank


class MemoryBank:
    """One bank directory opened for reading and writing.

    The only way to the manifest and the bank's files: ingest computes a clip's tokens, latent
    and embeddings, the bank writes them (``store`` is its internal piece, not an API).

    Args:
        root: The bank directory (created if missing).
        embedder: Embeds captions at ingest and prompts at search time.
        options: Storage and index options.
        visual: Optional keyframe/prompt embedder; adds a visual index fused into search.
        database_url: Where the manifest lives: ``None`` for the SQLite file in ``root``, or a
            ``postgresql://`` URL that every host of a fleet can share.
        files: Where latents and sources live: ``None`` for ``root`` itself, or a bucket
            (``memory_bank.storage``). The FAISS index files stay in ``root``.
        rebuild_index: Build the indexes from the manifest instead of loading a snapshot
            (``ditmem index rebuild``: one build, not a load or build and then another).
    """

    def __init__(
        self,
        root: str | Path,
        embedder: TextEmbedder,
        options: BankOptions | None = None,
        visual: VisualEmbedder | None = None,
        database_url: str | None = None,
        files: ObjectStorage | None = None,
        rebuild_index: bool = False,
    ) -> None:
        self.root = Path(root)
        self.embedder = embedder
        self.visual = visual
        self.options = options or BankOptions()
        self.store = ClipStore(self.root, database_url, files)
        self._check_models()
        self._sync = threading.Lock()
        self._unsaved = 0
        self._snapshotting = threading.Event()
        # The caption embedder is most of a search's time; prompts repeat (retries, previews
        # typed in the UI, batch runs), so their vectors are kept.
        self._query_vectors = _LruCache(self.options.query_cache_size)
        self._text = SyncedIndex(
            self.store, "text", embedder.name, embedder.dim, self.options.index, rebuild_index
        )
        self._visual = (
            SyncedIndex(
                self.store, "visual", visual.name, visual.dim, self.options.index, rebuild_index
            )
            if visual is not None
            else None
        )
        self.refresh()
        self._snapshot_lock = self.store.snapshot_lock()
        self._closing = threading.Event()
        self._snapshot_writer = threading.Thread(
            target=self._write_snapshots, name="ditmem-index-snapshots", daemon=True
        )
        self._snapshot_writer.start()

    def _check_models(self) -> None:
        foreign = self.store.embedders("text") - {self.embedder.name}
        if foreign:
            raise BankCorrupt(
                f"captions in {self.root} were embedded with {sorted(foreign)}, not "
                f"{self.embedder.name}; configure that embedder or re-embed the bank"
            )
        if self.visual is not None:
            foreign = self.store.embedders("visual") - {self.visual.name}
            if foreign:
                raise BankCorrupt(
                    f"keyframes in {self.root} were embedded with {sorted(foreign)}, not "
                    f"{self.visual.name}"
                )

    @property
    def _indexes(self) -> list[SyncedIndex]:
        return [self._text] + ([self._visual] if self._visual is not None else [])

    # -- index maintenance -------------------------------------------------------------------------

    def refresh(self) -> int:
        """Apply manifest changes made since the last refresh (by any process); returns how many.

        While a snapshot of the index is being copied this returns at once rather than wait:
        the caller searches what is applied, a few changes behind at most.
        """
        if self._snapshotting.is_set():
            if not self._sync.acquire(blocking=False):
                return 0
        else:
            self._sync.acquire()
        try:
            applied = 0
            for index in self._indexes:
                changes = self.store.changes_since(index.applied)
                if changes:
                    index.apply(changes)
                    applied = max(applied, len(changes))
            self._unsaved += applied
            return applied
        finally:
            self._sync.release()

    def rebuild_index(self) -> int:
        """Rebuild every index from the manifest and save them; returns the caption index size."""
        with self._sync:
            for index in self._indexes:
                index.rebuild()
            self._save_locked()
            return len(self._text)

    def save_index(self) -> None:
        """Snapshot the indexes now, in this thread."""
        with self._sync:
            self._save_locked()

    def _save_locked(self) -> None:
        for index in self._indexes:
            index.save()
        self._unsaved = 0

    def _snapshot_due(self) -> bool:
        # Enough changes since the last snapshot, or an index built here that none holds yet.
        never_saved = any(index.saved < 0 for index in self._indexes)
        return never_saved or self._unsaved >= self.options.save_index_every

    def _write_snapshots(self) -> None:
        """Background writer: snapshots the indexes when enough changes are applied, or once
        for an index built from the manifest, if this process holds the bank's snapshot lock
        (one writer per bank, on whichever host). No request ever waits for it."""
        wait = 0.0  # an index built on open is saved right away, so the next open loads it
        while not self._closing.wait(wait):
            wait = self.options.snapshot_interval_s
            try:
                if self._snapshot_due() and self._snapshot_lock.try_acquire():
                    self._snapshot_once()
            except Exception:  # the next round tries again; searching never depends on it
                logger.exception("index snapshot of %s failed", self.root)

    def _snapshot_once(self) -> None:
        copies = []
        self._snapshotting.set()
        try:
            with self._sync:  # the copies only: storing them happens after the lock
                for index in self._indexes:
                    copies.append((index, index.index.to_bytes(), index.applied))
                self._unsaved = 0
        finally:
            self._snapshotting.clear()
        for index, data, applied in copies:
            index.save_snapshot(data, applied)

    @property
    def index_size(self) -> int:
        """Clips in the caption index, i.e. in the bank, once changes are applied: a count
        that costs no query over the manifest."""
        self.refresh()
        return len(self._text)

    # -- reading -----------------------------------------------------------------------------------

    def search(
        self,
        query: str,
        k: int = 5,
        *,
        exclude_ids: list[int] | tuple[int, ...] = (),
        min_score: float | None = None,
    ) -> list[SearchHit]:
        """Clips that best match ``query``, best first.

        Scores are cosine similarities of prompt and caption embeddings; with a visual index,
        ``(1 - w) * caption score + w * keyframe score`` (see ``memory_bank.visual``), and
        ``min_score`` applies to that fused score.
        """
        if not query or not query.strip():
            raise ValueError("query must not be empty")
        if k < 1:
            return []
        self.refresh()
        exclude = list(exclude_ids)
        text_vector = self._query_vectors.get(query, lambda: self.embedder.embed([query]))
        if self._visual is None:
            ranked = self._text.search(text_vector, k, exclude, min_score)
            text_scores, visual_scores = dict(ranked), {}
        else:
            from memory_bank.visual import fuse_scores

            pool = max(4 * k, 20)  # fuse over more candidates than asked for
            text_scores = dict(self._text.search(text_vector, pool, exclude))
            visual_vector = self.visual.embed_texts([query])
            visual_scores = dict(self._visual.search(visual_vector, pool, exclude))
            fused = fuse_scores(text_scores, visual_scores, self.options.visual_weight)
            ranked = [
                (clip_id, score)
                for clip_id, score in fused
                if min_score is None or score >= min_score
            ][:k]
        # Captions only (one query): a hit needs no tags or file details.
        captions = self.store.captions([clip_id for clip_id, _ in ranked])
        return [
            SearchHit(
                clip_id=clip_id,
                score=float(score),
                caption=captions[clip_id],
                text_score=text_scores.get(clip_id),
                visual_score=visual_scores.get(clip_id),
            )
            for clip_id, score in ranked
            if clip_id in captions  # deleted by another process since the last refresh
        ]

    def get(self, clip_id: int) -> ClipRecord:
        return self.store.get(clip_id)

    def poster_jpeg(self, clip_id: int) -> bytes:
        """The clip's poster frame (JPEG bytes) for listings."""
        jpeg = self.store.poster_jpeg(clip_id)
        if jpeg is None:
            self.store.get(clip_id)  # ClipNotFound for an unknown id
            raise ClipNotFound(f"clip {clip_id} has no poster frame")
        return jpeg

    def get_many(self, clip_ids: list[int]) -> list[ClipRecord]:
        """Records in the order of ``clip_ids``; unknown ids raise :class:`ClipNotFound`."""
        return self.store.get_many(clip_ids)

    def list(
        self, *, before: int | None = None, limit: int = 50, tag: str | None = None
    ) -> ClipPage:
        """A page of clips newest first; pass its ``next_cursor`` as ``before`` for the next."""
        return self.store.list(before=before, limit=limit, tag=tag)

    def iter_clips(self, tag: str | None = None, page_size: int = 500) -> Iterator[ClipRecord]:
        """Every clip (of one tag), newest first, a page at a time."""
        before = None
        while True:
            page = self.list(before=before, limit=page_size, tag=tag)
            yield from page.items
            if page.next_cursor is None:
                return
            before = page.next_cursor

    def count(self, tag: str | None = None) -> int:
        """How many clips the bank holds (with ``tag``): a count query (``index_size`` counts
        all clips without one)."""
        return self.store.count(tag)

    def __len__(self) -> int:
        return self.store.count()

    def find_by_hash(self, content_hash: str) -> ClipRecord | None:
        """The clip whose uploaded file has this SHA-256 hex digest, if the bank holds it."""
        return self.store.find_by_hash(content_hash)

    def known_hashes(self, content_hashes: Sequence[str]) -> set[str]:
        """Which of these SHA-256 hex digests belong to clips in the bank (one query)."""
        return self.store.known_hashes(content_hashes)

    def caption_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int64 (n,), vectors float32 (n, dim))`` of every clip, by ascending id.

        The unit-norm caption embeddings the text index is built from.
        """
        return self.store.embeddings(kind="text")

    def clip_latent(self, clip_id: int) -> torch.Tensor | None:
        """The clip's stored canonical VAE latent ``(C, D, H, W)`` float32.

        ``None`` when the clip was ingested without one (``keep_latents`` off); an unknown id
        raises :class:`ClipNotFound`, a latent the manifest lists but the disk lacks
        :class:`BankCorrupt`.
        """
        content_hash, has_latent, _ = self.store.storage_of(clip_id)
        if not has_latent:
            return None
        try:
            return self.store.read_latent(content_hash)
        except ObjectMissing:
            if self.store.find_by_id(clip_id) is None:  # deleted meanwhile
                raise ClipNotFound(f"no clip with id {clip_id}") from None
            raise BankCorrupt(f"the latent file of clip {clip_id} is missing") from None

    def clip_source(self, clip_id: int) -> AbstractContextManager[Path] | None:
        """The clip's uploaded file as a local path for a ``with`` block (a download when the
        bank's files are in a bucket); ``None`` when it was not kept (``keep_sources``)."""
        content_hash, _, source_ext = self.store.storage_of(clip_id)
        return self.store.source_copy(content_hash, source_ext) if source_ext else None

    def latent_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Stored latents of every clip that kept one, by ascending id, ``batch_size`` at a time.

        Each batch is ``(b, C, D, H, W)`` float32 with ``b <= batch_size``; clips without a
        latent, or deleted while this runs, are skipped.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        ids, _ = self.caption_embeddings()
        batch: list[torch.Tensor] = []
        for clip_id in ids.tolist():
            try:
                latent = self.clip_latent(int(clip_id))
            except ClipNotFound:
                continue
            if latent is None:
                continue
            batch.append(latent)
            if len(batch) == batch_size:
                yield torch.stack(batch)
                batch = []
        if batch:
            yield torch.stack(batch)

    def stale_clips(self, encoder_version: str) -> list[int]:
        """Ids (ascending) of clips whose cached tokens were not made by ``encoder_version``."""
        return self.store.stale_clips(encoder_version)

    def clip_tokens(self, clip_ids: list[int], encoder_version: str) -> ClipTokens:
        """Cached tokens of the given clips (in that order) for one encoder version."""
        records = self.store.get_many(clip_ids)
        stale = [r.clip_id for r in records if r.encoder_version != encoder_version]
        if stale:
            raise BankCorrupt(
                f"clips {stale} have no tokens for encoder {encoder_version}; recompute the "
                "bank's tokens for this encoder"
            )
        cached = self.store.tokens_of(clip_ids, encoder_version)
        missing = [clip_id for clip_id in clip_ids if clip_id not in cached]
        if missing:
            raise BankCorrupt(f"clips {missing} lost their tokens; recompute the bank's tokens")
        return ClipTokens.stack([cached[clip_id] for clip_id in clip_ids])

    # -- writing -----------------------------------------------------------------------------------

    def add_clip(
        self,
        clip: NewClip,
        *,
        tokens: ClipTokens,
        encoder_version: str,
        poster_jpeg: bytes,
        latent: torch.Tensor | None = None,
        source: Path | None = None,
    ) -> AddedClip:
        """Store one new clip (see :meth:`add_clips`)."""
        return self.add_clips(
            [ClipToAdd(clip, tokens, encoder_version, poster_jpeg, latent, source)]
        )[0]

    def add_clips(self, items: Sequence[ClipToAdd]) -> list[AddedClip]:
        """Store new clips: their files first, then their manifest rows in one transaction,
        then their index entries.

        A crash before the rows are written leaves only unreferenced files (see
        ``collect_garbage``), never a row pointing at a missing file. A clip whose content hash
        is already in the bank - e.g. ingested concurrently by another process - comes back as
        that clip with ``created=False``; its files are the same as these.
        """
        rows = []
        for item in items:
            keep_latent = self.options.keep_latents and item.latent is not None
            source_ext = None
            if self.options.keep_sources and item.source is not None:
                source_ext = item.source.suffix.lower() or ".bin"
            content_hash = item.clip.content_hash
            if keep_latent:
                self.store.put_latent(content_hash, item.latent)
            if source_ext is not None:
                self.store.put_source(content_hash, source_ext, item.source)
            rows.append(
                ClipRow(
                    item.clip,
                    item.tokens,
                    item.encoder_version,
                    item.poster_jpeg,
                    has_latent=keep_latent,
                    source_ext=source_ext,
                )
            )
        added = [AddedClip(record, created) for record, created in self.store.insert_many(rows)]
        if any(clip.created for clip in added):
            self.refresh()
        return added

    def replace_tokens(self, clip_id: int, encoder_version: str, tokens: ClipTokens) -> None:
        """Cache the clip's tokens ``(1, U, F)`` from another encoder and make them current, in
        one transaction (the tokens of the previous version stay for workers still using it)."""
        self.store.set_tokens(clip_id, encoder_version, tokens)

    def delete(self, clip_id: int) -> ClipRecord:
        """Remove a clip's row, files and index entry."""
        record = self.store.delete(clip_id)
        self.refresh()
        return record

    def close(self) -> None:
        self._closing.set()
        self._snapshot_writer.join(timeout=60)
        try:
            if any(index.unsaved for index in self._indexes) and self._snapshot_lock.try_acquire():
                self._snapshot_once()
        finally:
            self._snapshot_lock.release()
            self.store.close()

    def __enter__(self) -> MemoryBank:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
