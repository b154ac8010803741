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
from pathlib import Path
from typing import Protocol

import numpy as np
from pydantic import BaseModel, Field

from memory_bank.embed import TextEmbedder
from memory_bank.errors import BankCorrupt
from memory_bank.index import IndexConfig
from memory_bank.schemas import ClipPage, ClipRecord, SearchHit
from memory_bank.store import ClipStore
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
        1000, ge=1, description="save the indexes after this many applied changes"
    )
    visual_weight: float = Field(
        0.3, ge=0, le=1, description="weight of the visual score when a visual index is on"
    )


class MemoryBank:
    """One bank directory opened for reading and writing.

    Args:
        root: The bank directory (created if missing).
        embedder: Embeds captions at ingest and prompts at search time.
        options: Storage and index options.
        visual: Optional keyframe/prompt embedder; adds a visual index fused into search.
    """

    def __init__(
        self,
        root: str | Path,
        embedder: TextEmbedder,
        options: BankOptions | None = None,
        visual: VisualEmbedder | None = None,
    ) -> None:
        self.root = Path(root)
        self.embedder = embedder
        self.visual = visual
        self.options = options or BankOptions()
        self.store = ClipStore(self.root)
        self._check_models()
        self._sync = threading.Lock()
        self._unsaved = 0
        self._text = SyncedIndex(
            self.store, "text", embedder.name, embedder.dim, self.options.index
        )
        self._visual = (
            SyncedIndex(self.store, "visual", visual.name, visual.dim, self.options.index)
            if visual is not None
            else None
        )
        self.refresh()

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
        """Apply manifest changes made since the last refresh (by any process); returns how many."""
        with self._sync:
            applied = 0
            for index in self._indexes:
                changes = self.store.changes_since(index.applied)
                if changes:
                    index.apply(changes)
                    applied = max(applied, len(changes))
            self._unsaved += applied
            if self._unsaved >= self.options.save_index_every:
                self._save_locked()
            return applied

    def rebuild_index(self) -> int:
        """Rebuild every index from the manifest and save them; returns the caption index size."""
        with self._sync:
            for index in self._indexes:
                index.rebuild()
            self._save_locked()
            return len(self._text)

    def save_index(self) -> None:
        with self._sync:
            self._save_locked()

    def _save_locked(self) -> None:
        for index in self._indexes:
            index.save()
        self._unsaved = 0

    @property
    def index_size(self) -> int:
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
        text_vector = self.embedder.embed([query])
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
        records = self.store.find_many([clip_id for clip_id, _ in ranked])
        return [
            SearchHit(
                clip_id=clip_id,
                score=float(score),
                caption=records[clip_id].caption,
                text_score=text_scores.get(clip_id),
                visual_score=visual_scores.get(clip_id),
            )
            for clip_id, score in ranked
            if clip_id in records  # deleted by another process since the last refresh
        ]

    def get(self, clip_id: int) -> ClipRecord:
        return self.store.get(clip_id)

    def poster_path(self, record: ClipRecord) -> Path:
        """Where the clip's poster frame (a JPEG) is stored."""
        return self.store.poster_path(record.content_hash)

    def get_many(self, clip_ids: list[int]) -> list[ClipRecord]:
        """Records in the order of ``clip_ids``; unknown ids raise :class:`ClipNotFound`."""
        return self.store.get_many(clip_ids)

    def list(self, *, offset: int = 0, limit: int = 50, tag: str | None = None) -> ClipPage:
        return self.store.list(offset=offset, limit=limit, tag=tag)

    def __len__(self) -> int:
        return self.store.count()

    def clip_tokens(self, clip_ids: list[int], encoder_version: str) -> ClipTokens:
        """Cached tokens of the given clips (in that order) for one encoder version."""
        records = self.store.get_many(clip_ids)
        stale = [r.clip_id for r in records if r.encoder_version != encoder_version]
        if stale:
            raise BankCorrupt(
                f"clips {stale} have no tokens for encoder {encoder_version}; recompute the "
                "bank's tokens for this encoder"
            )
        return ClipTokens.stack(
            [self.store.read_tokens(r.content_hash, encoder_version) for r in records]
        )

    # -- writing -----------------------------------------------------------------------------------

    def delete(self, clip_id: int) -> ClipRecord:
        """Remove a clip's row, files and index entry."""
        record = self.store.delete(clip_id)
        self.refresh()
        return record

    def close(self) -> None:
        with self._sync:
            if self._unsaved:
                self._save_locked()
        self.store.close()

    def __enter__(self) -> MemoryBank:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
