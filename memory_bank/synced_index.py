"""A FAISS index kept in step with the manifest: a materialised view of one embedding column.

Saved as ``index/<name>-<log position>.faiss`` plus a ``<name>.json`` pointer, so the file and
the change-log position it reflects can never disagree, even when two processes save at once.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from memory_bank.errors import IndexCorrupt
from memory_bank.index import IndexConfig, VectorIndex
from memory_bank.store import Change, ClipStore

logger = logging.getLogger(__name__)

KEEP_SAVED = 3  # older files may still be being loaded by another process


class SyncedIndex:
    """One embedding kind (``"text"`` or ``"visual"``) of one bank, searchable.

    Args:
        store: The bank's manifest and files.
        kind: Which embedding column the index holds.
        model_name: The embedding model; a saved index of another model is rebuilt.
        dim: Vector width.
        config: FAISS index options.
    """

    def __init__(
        self, store: ClipStore, kind: str, model_name: str, dim: int, config: IndexConfig
    ) -> None:
        self.store = store
        self.kind = kind
        self.model_name = model_name
        self.dim = dim
        self.config = config
        self.folder = store.root / "index"
        self.index, self.applied = self._load_saved()

    @property
    def _pointer(self) -> Path:
        return self.folder / f"{self.kind}.json"

    def _load_saved(self) -> tuple[VectorIndex, int]:
        try:
            pointer = json.loads(self._pointer.read_text())
            if pointer["model"] != self.model_name or pointer["dim"] != self.dim:
                raise IndexCorrupt(f"saved for {pointer['model']}, not {self.model_name}")
            index = VectorIndex.load(self.folder / pointer["file"], self.config)
            return index, int(pointer["seq"])
        except FileNotFoundError:
            pass
        except (IndexCorrupt, KeyError, ValueError) as error:
            logger.warning("rebuilding the %s index of %s: %s", self.kind, self.store.root, error)
        return self.build()

    def build(self) -> tuple[VectorIndex, int]:
        """A fresh index of the whole manifest and the log position it reflects."""
        # Read the position first: changes after it are replayed later, never lost.
        seq = self.store.last_change()
        ids, vectors = self.store.embeddings(kind=self.kind)
        if len(ids):
            return VectorIndex.build(self.dim, ids, vectors, self.config), seq
        return VectorIndex.empty(self.dim, self.config), seq

    def rebuild(self) -> None:
        self.index, self.applied = self.build()

    def apply(self, changes: list[Change]) -> None:
        """Replay change-log entries (in order) onto the index."""
        final_op: dict[int, str] = {}
        for change in changes:
            final_op[change.clip_id] = change.op
        removed = [clip_id for clip_id, op in final_op.items() if op == "delete"]
        added = [clip_id for clip_id, op in final_op.items() if op == "add"]
        if removed:
            self.index.remove(np.array(removed, dtype=np.int64))
        if added:
            # A clip deleted again since (by a change not yet logged) is simply absent here.
            ids, vectors = self.store.embeddings(added, kind=self.kind)
            if len(ids):
                self.index.add(ids, vectors)
        self.applied = changes[-1].seq
        if self.index.needs_rebuild():
            self.rebuild()

    def save(self) -> None:
        name = f"{self.kind}-{self.applied:012d}.faiss"
        self.index.save(self.folder / name)
        pointer = {"file": name, "seq": self.applied, "model": self.model_name, "dim": self.dim}
        self.store.write_atomically(self._pointer, lambda tmp: tmp.write_text(json.dumps(pointer)))
        for stale in sorted(self.folder.glob(f"{self.kind}-*.faiss"))[:-KEEP_SAVED]:
            stale.unlink(missing_ok=True)

    def search(
        self,
        vector: np.ndarray,
        k: int,
        exclude_ids: list[int],
        min_score: float | None = None,
    ) -> list[tuple[int, float]]:
        return self.index.search(vector, k, exclude_ids=exclude_ids, min_score=min_score)[0]

    def __len__(self) -> int:
        return len(self.index)
