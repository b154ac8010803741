"""The memory bank: clip store + caption index, kept in step through the manifest's change log.

The manifest (SQLite) is the source of truth; the FAISS index is a materialised view of it. Each
write appends to a change log in the same transaction as the row, and every bank handle - in
this process or another (API and workers share one bank directory) - brings its in-memory index
up to date by replaying the log before it searches. The index is saved now and then, with the
log position it reflects in its file name, so opening a large bank replays only the tail.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from memory_bank.embed import TextEmbedder
from memory_bank.errors import BankCorrupt, IndexCorrupt
from memory_bank.index import IndexConfig, VectorIndex
from memory_bank.schemas import ClipPage, ClipRecord, SearchHit
from memory_bank.store import ClipStore
from model.tokens import ClipTokens

logger = logging.getLogger(__name__)

TEXT_INDEX = "text"


class BankOptions(BaseModel):
    """How a bank stores clips and indexes them."""

    keep_latents: bool = Field(True, description="store each clip's canonical VAE latent")
    keep_sources: bool = Field(False, description="store the uploaded file itself")
    index: IndexConfig = Field(default_factory=IndexConfig)
    save_index_every: int = Field(
        1000, ge=1, description="save the index after this many applied changes"
    )


class MemoryBank:
    """One bank directory opened for reading and writing.

    Args:
        root: The bank directory (created if missing).
        embedder: Embeds captions at ingest and prompts at search time.
        options: Storage and index options.
    """

    def __init__(
        self, root: str | Path, embedder: TextEmbedder, options: BankOptions | None = None
    ) -> None:
        self.root = Path(root)
        self.embedder = embedder
        self.options = options or BankOptions()
        self.store = ClipStore(self.root)
        foreign = self.store.embedders() - {embedder.name}
        if foreign:
            raise BankCorrupt(
                f"captions in {self.root} were embedded with {sorted(foreign)}, not "
                f"{embedder.name}; configure that embedder or re-embed the bank"
            )
        self._sync = threading.Lock()
        self._unsaved = 0
        self._index, self._applied = self._load_saved_index()
        self.refresh()

    # -- index maintenance -------------------------------------------------------------------------

    @property
    def _pointer(self) -> Path:
        return self.root / "index" / f"{TEXT_INDEX}.json"

    def _load_saved_index(self) -> tuple[VectorIndex, int]:
        try:
            pointer = json.loads(self._pointer.read_text())
            if pointer["embedder"] != self.embedder.name or pointer["dim"] != self.embedder.dim:
                raise IndexCorrupt("index was built for another embedder")
            index = VectorIndex.load(self.root / "index" / pointer["file"], self.options.index)
            return index, int(pointer["seq"])
        except FileNotFoundError:
            pass
        except (IndexCorrupt, KeyError, ValueError) as error:
            logger.warning("rebuilding the caption index of %s: %s", self.root, error)
        return self._build_from_manifest()

    def _build_from_manifest(self) -> tuple[VectorIndex, int]:
        # Read the log position first: changes after it are replayed, never lost.
        seq = self.store.last_change()
        ids, vectors = self.store.embeddings()
        if len(ids):
            index = VectorIndex.build(self.embedder.dim, ids, vectors, self.options.index)
        else:
            index = VectorIndex.empty(self.embedder.dim, self.options.index)
        return index, seq

    def refresh(self) -> int:
        """Apply manifest changes made since the last refresh (by any process); returns how many."""
        with self._sync:
            changes = self.store.changes_since(self._applied)
            if not changes:
                return 0
            final_op: dict[int, str] = {}
            for change in changes:
                final_op[change.clip_id] = change.op
            removed = [clip_id for clip_id, op in final_op.items() if op == "delete"]
            added = [clip_id for clip_id, op in final_op.items() if op == "add"]
            if removed:
                self._index.remove(np.array(removed, dtype=np.int64))
            if added:
                # A clip added then deleted by a later, not yet logged, change is simply absent.
                ids, vectors = self.store.embeddings(added)
                if len(ids):
                    self._index.add(ids, vectors)
            self._applied = changes[-1].seq
            self._unsaved += len(changes)
            if self._index.needs_rebuild():
                self._index, self._applied = self._build_from_manifest()
                self._save_locked()
            elif self._unsaved >= self.options.save_index_every:
                self._save_locked()
            return len(changes)

    def rebuild_index(self) -> int:
        """Rebuild the caption index from the manifest and save it; returns its size."""
        with self._sync:
            self._index, self._applied = self._build_from_manifest()
            self._save_locked()
            return len(self._index)

    def save_index(self) -> None:
        with self._sync:
            self._save_locked()

    def _save_locked(self) -> None:
        folder = self.root / "index"
        name = f"{TEXT_INDEX}-{self._applied:012d}.faiss"
        self._index.save(folder / name)
        pointer = {
            "file": name,
            "seq": self._applied,
            "embedder": self.embedder.name,
            "dim": self.embedder.dim,
        }
        self.store.write_atomically(self._pointer, lambda tmp: tmp.write_text(json.dumps(pointer)))
        # Keep the newest few: another process may be loading an older one right now.
        saved = sorted(folder.glob(f"{TEXT_INDEX}-*.faiss"))
        for stale in saved[:-3]:
            stale.unlink(missing_ok=True)
        self._unsaved = 0

    @property
    def index_size(self) -> int:
        return len(self._index)

    # -- reading -----------------------------------------------------------------------------------

    def search(
        self,
        query: str,
        k: int = 5,
        *,
        exclude_ids: list[int] | tuple[int, ...] = (),
        min_score: float | None = None,
    ) -> list[SearchHit]:
        """Clips whose captions best match ``query`` (cosine similarity), best first."""
        if not query or not query.strip():
            raise ValueError("query must not be empty")
        if k < 1:
            return []
        self.refresh()
        vector = self.embedder.embed([query])
        hits = self._index.search(vector, k, exclude_ids=list(exclude_ids), min_score=min_score)[0]
        if not hits:
            return []
        records = {r.clip_id: r for r in self._existing([clip_id for clip_id, _ in hits])}
        return [
            SearchHit(clip_id=clip_id, score=float(score), caption=records[clip_id].caption)
            for clip_id, score in hits
            if clip_id in records  # deleted by another process since the last refresh
        ]

    def _existing(self, clip_ids: list[int]) -> list[ClipRecord]:
        page = [self.store.find_by_id(clip_id) for clip_id in clip_ids]
        return [record for record in page if record is not None]

    def get(self, clip_id: int) -> ClipRecord:
        return self.store.get(clip_id)

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
