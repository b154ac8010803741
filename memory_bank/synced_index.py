"""A FAISS index kept in step with the manifest: a materialised view of one embedding column.

A process starts from the newest snapshot (``index/<name>-<log position>.faiss`` plus an
``index/<name>.json`` pointer, in the bank's file storage, so every host of a fleet shares them)
and replays the change log past the position the snapshot reflects. The snapshot file and its
position can never disagree, even when two processes save at once, because the pointer is
written last and names both. Snapshots are written by :class:`~memory_bank.bank.MemoryBank`'s
background writer, never by a search.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from memory_bank.errors import BankError, IndexCorrupt
from memory_bank.index import IndexConfig, VectorIndex
from memory_bank.storage import ObjectMissing
from memory_bank.store import Change, ClipStore

logger = logging.getLogger(__name__)

KEEP_SAVED = 3  # older snapshots may still be being loaded by another process
FOLDER = "index"


class SyncedIndex:
    """One embedding kind (``"text"`` or ``"visual"``) of one bank, searchable.

    Args:
        store: The bank's manifest and files.
        kind: Which embedding column the index holds.
        model_name: The embedding model; a saved index of another model is rebuilt.
        dim: Vector width.
        config: FAISS index options.
        rebuild: Build from the manifest even when a snapshot exists.
    """

    def __init__(
        self,
        store: ClipStore,
        kind: str,
        model_name: str,
        dim: int,
        config: IndexConfig,
        rebuild: bool = False,
    ) -> None:
        self.store = store
        self.kind = kind
        self.model_name = model_name
        self.dim = dim
        self.config = config
        if rebuild:
            self.index, self.applied = self.build()
            from_snapshot = False
        else:
            self.index, self.applied, from_snapshot = self._load_saved()
        # The log position of the newest stored snapshot; -1: none, the index was built here.
        self.saved = self.applied if from_snapshot else -1

    @property
    def _pointer(self) -> str:
        return f"{FOLDER}/{self.kind}.json"

    def _load_saved(self) -> tuple[VectorIndex, int, bool]:
        """The newest snapshot, or a fresh build; and whether it came from a snapshot."""
        files = self.store.files
        try:
            pointer = json.loads(files.get_bytes(self._pointer))
            if pointer["model"] != self.model_name or pointer["dim"] != self.dim:
                raise IndexCorrupt(f"saved for {pointer['model']}, not {self.model_name}")
            key = f"{FOLDER}/{pointer['file']}"
            # Read from a file (the bank's own, or a download of the bucket's): no copy of a
            # 1.5 GB snapshot in memory on its way into FAISS.
            with files.local_copy(key) as path:
                index = VectorIndex.load(path, self.config)
            return index, int(pointer["seq"]), True
        except ObjectMissing:
            pass
        except (IndexCorrupt, KeyError, ValueError) as error:
            logger.warning("rebuilding the %s index of %s: %s", self.kind, self.store.root, error)
        return (*self.build(), False)

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

    @property
    def unsaved(self) -> bool:
        return self.applied != self.saved

    def save(self) -> None:
        """Store a snapshot of the index as it is now; searches and changes go on meanwhile.

        ``index`` and ``applied`` are read together, before the copy, by the caller that holds
        the bank's sync lock; the slow part (storing the bytes) needs no lock.
        """
        index, applied = self.index, self.applied
        self.save_snapshot(index.to_bytes(), applied)

    def save_snapshot(self, data: bytes, applied: int) -> None:
        files = self.store.files
        name = f"{self.kind}-{applied:012d}.faiss"
        files.put_bytes(f"{FOLDER}/{name}", data)
        pointer = {"file": name, "seq": applied, "model": self.model_name, "dim": self.dim}
        files.put_bytes(self._pointer, json.dumps(pointer).encode())
        self.saved = applied
        try:
            snapshots = sorted(files.keys(f"{FOLDER}/{self.kind}-"))
            for stale in snapshots[:-KEEP_SAVED]:
                files.delete(stale)
        except BankError as error:  # cleaning up is best effort; the snapshot is stored
            logger.warning("could not remove old %s snapshots: %s", self.kind, error)

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
