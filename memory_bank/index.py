"""Cosine-similarity vector index: a thin FAISS wrapper keyed by stable int64 ids.

The index knows nothing about clips. It is a materialised view of the embeddings held in the
manifest (SQLite), so it is always rebuildable from ``(ids, vectors)`` with
:meth:`VectorIndex.build` and kept current with :meth:`VectorIndex.add` and
:meth:`VectorIndex.remove`. Vectors are L2-normalised on the way in, so inner product is cosine
similarity.

Two layouts, chosen by size:

* ``flat``: ``IndexIDMap2(IndexFlatIP)``, exact. Used up to ``exact_max`` vectors, where a full
  scan is still only a few milliseconds.
* ``ivf``: ``IndexIVFFlat`` (or ``IndexIVFScalarQuantizer`` 8-bit) with an inner-product coarse
  quantizer and a hash-table direct map, so ids can be removed in O(1) each. Approximate; recall
  is governed by ``nprobe``.

Both keep the id map inside the FAISS index, so a saved file is self-contained.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
from faiss.contrib.ivf_tools import add_preassigned
from numpy.typing import ArrayLike, NDArray
from pydantic import BaseModel, ConfigDict, Field

from memory_bank.errors import IndexCorrupt
from model.atomic import atomic_path

__all__ = ["IndexConfig", "VectorIndex"]

# IVF training. A k-means sample of 32 points per list (FAISS warns below 39; we stay close to
# that because training cost is linear in it and 2 cores must train 4096 lists for 1M vectors in
# well under a minute) and 10 iterations (FAISS's own IVF default) give centroids whose recall
# is indistinguishable from a full-data k-means on clustered embeddings.
_TRAIN_POINTS_PER_LIST = 32
_MIN_TRAIN_POINTS_PER_LIST = 39  # below this FAISS considers k-means under-determined
_KMEANS_ITERATIONS = 10
_SQ_TRAIN_POINTS = 32_768  # 8-bit scalar quantizer only learns per-dimension ranges
_NLIST_MIN, _NLIST_MAX = 16, 65_536
_ASSIGN_CHUNK = 8_192  # rows per BLAS call when assigning vectors to lists
_SEED = 1234  # builds are deterministic for the same input
# IVF is rebuilt once it holds this many times the size its nlist was designed for.
_IVF_STALE_GROWTH = 4
# FAISS GPU k-selection is limited to 2048 results per query.
_GPU_MAX_K = 2048
_GPU_TEMP_MEMORY = 256 * 1024 * 1024  # k<=2048 searches need little; leave the GPU to the DiT


class IndexConfig(BaseModel):
    """How a :class:`VectorIndex` lays itself out; defaults tuned with ``bench/bank_search.py``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # 20K keeps a flat scan near 1.4 ms p50 on 2 cores; at 50K it took 4.2 ms p50 / 5.8 ms p99,
    # slower than IVF at 1M, whose recall@5 on clustered data was 1.000 (bench/bank_search.py).
    exact_max: int = Field(
        20_000, ge=0, description="up to this many vectors: exact flat index; above: IVF"
    )
    nlist: int | None = Field(
        None, ge=1, description="IVF lists; None: ~4*sqrt(n) rounded to a power of two"
    )
    nprobe: int = Field(32, ge=1, description="IVF lists scanned per query (recall vs latency)")
    ivf_storage: Literal["flat", "sq8"] = Field(
        "flat", description="IVF vector storage: float32, or 8-bit scalar quantised (4x smaller)"
    )
    use_gpu: bool | Literal["auto"] = Field(
        "auto", description="search on a GPU replica; auto: when faiss has GPU support and a GPU"
    )
    # 1 by default: a single-query flat search splits its scan over the OpenMP team, and on a
    # 2-core machine shared with other work the team keeps waiting for a descheduled member, which
    # made flat searches several times slower (docs/benchmarks.md, memory bank section); IVF
    # single queries are single-threaded either way. Concurrent requests still use every core.
    threads: int | None = Field(
        1, ge=1, description="faiss OpenMP threads for this index's calls; None: leave as is"
    )


class _RWLock:
    """Writer-preferring readers-writer lock.

    Searches release the GIL inside FAISS, so concurrent searches really run in parallel; a plain
    mutex would serialise them and multiply tail latency by the number of concurrent requests.
    Writers are preferred so a steady stream of searches cannot starve ingest: once a writer
    waits, new readers queue behind it. A reader is therefore blocked for at most the searches
    already in flight plus one write critical section, and writes are kept to microseconds.
    Not re-entrant: code holding the lock must not take it again.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# omp_set_num_threads only changes the calling thread's OpenMP setting (libgomp keeps it per
# thread), so it has to be applied in every thread that calls FAISS; remember what each thread
# last set to make that a no-op after the first call.
_omp_state = threading.local()


def _apply_threads(threads: int | None) -> None:
    if threads is not None and getattr(_omp_state, "threads", None) != threads:
        faiss.omp_set_num_threads(threads)
        _omp_state.threads = threads


def _gpu_available() -> bool:
    return (
        hasattr(faiss, "StandardGpuResources") and getattr(faiss, "get_num_gpus", lambda: 0)() > 0
    )


_gpu_resources: Any = None
_gpu_resources_lock = threading.Lock()


def _shared_gpu_resources() -> Any:
    """One ``StandardGpuResources`` per process: each one reserves its own scratch memory."""
    global _gpu_resources
    with _gpu_resources_lock:
        if _gpu_resources is None:
            res = faiss.StandardGpuResources()
            res.setTempMemory(_GPU_TEMP_MEMORY)
            _gpu_resources = res
        return _gpu_resources


def _wants_gpu(use_gpu: bool | Literal["auto"]) -> bool:
    if use_gpu == "auto":
        return _gpu_available()
    if use_gpu and not _gpu_available():
        raise ValueError("use_gpu=True but faiss has no GPU support or sees no GPU")
    return bool(use_gpu)


def _as_ids(ids: ArrayLike, what: str = "ids") -> NDArray[np.int64]:
    """Validate and copy ids to a contiguous int64 array."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)  # np.asarray([]) is float64; accept it
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{what} must fit in int64")
    out = np.ascontiguousarray(arr, dtype=np.int64).copy()
    # FAISS reports "no result" as -1, so negative ids could not be told apart from padding.
    if int(out.min()) < 0:
        raise ValueError(f"{what} must be non-negative")
    return out


def _as_unit_vectors(vectors: ArrayLike, dim: int, what: str) -> NDArray[np.float32]:
    """Validate ``(n, dim)`` floats and return an L2-normalised float32 copy."""
    arr = np.asarray(vectors)
    if arr.dtype.kind != "f":
        raise ValueError(f"{what} must be floating point, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"{what} must have shape (n, {dim}), got {arr.shape}")
    # Always a fresh array: callers' buffers are never normalised in place.
    out = np.array(arr, dtype=np.float32, order="C", copy=True)
    if out.shape[0] == 0:
        return out
    # einsum avoids the (n, dim) temporary np.linalg.norm would allocate (1.5 GB at 1M x 384).
    norms = np.sqrt(np.einsum("ij,ij->i", out, out))
    if not np.all(np.isfinite(norms)):
        raise ValueError(f"{what} contain NaN or infinite values")
    if np.any(norms == 0):
        raise ValueError(f"{what} contain an all-zero vector, which has no direction")
    out /= norms[:, None]
    return out


def _auto_nlist(n: int) -> int:
    """~4*sqrt(n) rounded to a power of two, with at least 39 training points per list."""
    nlist = 2 ** round(math.log2(max(4 * math.sqrt(max(n, 1)), 1)))
    cap = max(1, n // _MIN_TRAIN_POINTS_PER_LIST)
    cap = 2 ** int(math.log2(cap))  # largest power of two within the cap
    return int(min(max(nlist, _NLIST_MIN), cap, _NLIST_MAX))


def _designed_size(nlist: int) -> int:
    """The index size an automatically chosen ``nlist`` suits: n with 4*sqrt(n) = nlist."""
    return max(nlist * nlist // 16, _MIN_TRAIN_POINTS_PER_LIST * nlist)


def _assign(x: NDArray[np.float32], centroids: NDArray[np.float32]) -> NDArray[np.int64]:
    """Nearest centroid (max inner product) of each row, in BLAS-sized chunks.

    For the large batches of a build: numpy's BLAS runs this ~4x faster on 2 cores than FAISS's
    flat-search assignment (a matrix product followed by a top-1 reduction), and it dominates
    IVF build time.
    """
    out = np.empty(x.shape[0], dtype=np.int64)
    buf = np.empty((min(_ASSIGN_CHUNK, x.shape[0]), centroids.shape[0]), dtype=np.float32)
    for start in range(0, x.shape[0], _ASSIGN_CHUNK):
        stop = min(start + _ASSIGN_CHUNK, x.shape[0])
        scores = buf[: stop - start]
        np.matmul(x[start:stop], centroids.T, out=scores)
        out[start:stop] = scores.argmax(axis=1)
    return out


def _spherical_kmeans(
    x: NDArray[np.float32], k: int, iterations: int, rng: np.random.Generator
) -> NDArray[np.float32]:
    """k-means on the unit sphere (centroids re-normalised), matching the inner-product metric."""
    centroids = x[rng.choice(x.shape[0], size=k, replace=False)].copy()
    for _ in range(iterations):
        labels = _assign(x, centroids)
        counts = np.bincount(labels, minlength=k)
        # Sum members per centroid with one sort + reduceat (np.add.at is far slower).
        order = np.argsort(labels, kind="stable")
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        filled = counts > 0
        centroids[filled] = np.add.reduceat(x[order], starts[filled], axis=0)
        # An empty list would never be probed usefully; re-seed it on a random training point.
        empty = np.flatnonzero(~filled)
        if empty.size:
            centroids[empty] = x[rng.choice(x.shape[0], size=empty.size, replace=False)]
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return centroids


class VectorIndex:
    """Cosine-similarity search over L2-normalised float32 vectors keyed by int64 ids.

    Create with :meth:`build`, :meth:`empty` or :meth:`load`, not the constructor.

    Thread safety: any number of threads may call :meth:`search` (and the other read methods)
    while one or more threads call :meth:`add` / :meth:`remove`. Reads share a readers-writer
    lock; a write holds it exclusively only for the FAISS mutation itself (validation,
    normalisation and IVF list assignment happen before it is taken). Measured on 2 cores: one
    IVF insert, replacement or removal holds it ~20 us; one flat insert a few us, except when
    the flat array doubles its capacity (a copy of the whole array, tens of ms at 50K vectors,
    a handful of times over the index's life); a flat replacement or removal ~2-3 ms at 50K
    (FAISS compacts the array and rebuilds its reverse id map). Readers are never blocked longer
    than that plus the searches already running.
    """

    def __init__(self, index: faiss.Index, config: IndexConfig) -> None:
        """Wrap an inner-product FAISS index of a supported layout (use the classmethods)."""
        self._index = index
        self._config = config
        self._lock = _RWLock()
        self._dim = int(index.d)
        self._kind: Literal["flat", "ivf"]
        # IVF: the coarse quantizer never changes after build, so new vectors are assigned to
        # lists with it before the write lock is taken (concurrent read-only use is safe).
        self._quantizer: faiss.Index | None = None
        if isinstance(index, faiss.IndexIDMap2):
            self._kind = "flat"
        else:
            self._kind = "ivf"
            self._quantizer = faiss.downcast_index(index.quantizer)
            index.nprobe = min(config.nprobe, index.nlist)
        # GPU: the CPU index stays authoritative (FAISS GPU indexes cannot remove ids); a replica
        # is uploaded lazily and re-uploaded on the first search after a write.
        self._gpu = _wants_gpu(config.use_gpu)
        self._gpu_index: Any = None
        self._gpu_stale = True
        self._gpu_lock = threading.Lock()  # GPU resources are not safe for concurrent searches

    # ------------------------------------------------------------------ construction

    @classmethod
    def empty(cls, dim: int, config: IndexConfig | None = None) -> VectorIndex:
        """An empty exact index of dimension ``dim``."""
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), config or IndexConfig())

    @classmethod
    def build(
        cls,
        dim: int,
        ids: ArrayLike,
        vectors: ArrayLike,
        config: IndexConfig | None = None,
    ) -> VectorIndex:
        """Build an index from scratch, choosing its layout from the number of vectors.

        Args:
            dim: Vector dimension.
            ids: ``(n,)`` distinct non-negative integer ids.
            vectors: ``(n, dim)`` floating point vectors; normalised copies are stored.
            config: Layout and search settings; defaults to ``IndexConfig()``.

        Returns:
            A flat index when ``n <= config.exact_max``, otherwise a trained IVF index.

        Raises:
            ValueError: On bad shapes, dtypes, duplicate or negative ids, zero or non-finite
                vectors.
        """
        config = config or IndexConfig()
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        id_arr = _as_ids(ids)
        x = _as_unit_vectors(vectors, dim, "vectors")
        if x.shape[0] != id_arr.shape[0]:
            raise ValueError(f"{id_arr.shape[0]} ids but {x.shape[0]} vectors")
        if np.unique(id_arr).size != id_arr.size:
            raise ValueError("ids must be distinct")
        _wants_gpu(config.use_gpu)  # fail on an impossible GPU request before the slow part
        _apply_threads(config.threads)
        n = x.shape[0]
        if n <= config.exact_max:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
            if n:
                index.add_with_ids(x, id_arr)
            return cls(index, config)

        rng = np.random.default_rng(_SEED)
        nlist = min(config.nlist, n) if config.nlist is not None else _auto_nlist(n)
        n_train = min(n, max(nlist, _TRAIN_POINTS_PER_LIST * nlist))
        # Sorted sample indices keep the gather sequential in memory.
        sample = x[np.sort(rng.choice(n, size=n_train, replace=False))]
        centroids = _spherical_kmeans(sample, nlist, _KMEANS_ITERATIONS, rng)
        index = cls._new_ivf(dim, centroids, config.ivf_storage)
        if not index.is_trained:  # sq8: learn per-dimension ranges of the residuals
            # Strided, not a prefix: the sorted sample's prefix is the start of the input only.
            index.train(sample[:: max(1, n_train // _SQ_TRAIN_POINTS)])
        del sample
        add_preassigned(index, x, _assign(x, centroids), id_arr)
        return cls(index, config)

    @staticmethod
    def _new_ivf(
        dim: int, centroids: NDArray[np.float32], storage: Literal["flat", "sq8"]
    ) -> faiss.IndexIVF:
        quantizer = faiss.IndexFlatIP(dim)
        quantizer.add(centroids)  # an already-filled quantizer means FAISS skips its k-means
        nlist = centroids.shape[0]
        if storage == "sq8":
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            )
        else:
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        # A hash-table direct map makes remove_ids O(1) per id instead of a scan of every list.
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        return index

    # ------------------------------------------------------------------ properties

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return self._dim

    @property
    def kind(self) -> Literal["flat", "ivf"]:
        """``"flat"`` (exact) or ``"ivf"`` (approximate)."""
        return self._kind

    @property
    def nlist(self) -> int | None:
        """Number of IVF lists, None for a flat index."""
        return int(self._index.nlist) if self._kind == "ivf" else None

    @property
    def storage(self) -> Literal["flat", "sq8"]:
        """How vectors are stored: float32 (``"flat"``) or 8-bit scalar quantised (``"sq8"``)."""
        return "sq8" if isinstance(self._index, faiss.IndexIVFScalarQuantizer) else "flat"

    @property
    def config(self) -> IndexConfig:
        """The configuration this index was built or loaded with."""
        return self._config

    def __len__(self) -> int:
        with self._lock.read():
            return int(self._index.ntotal)

    def __contains__(self, item: object) -> bool:
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
            return False
        with self._lock.read():
            return self._has(int(item))

    def __repr__(self) -> str:
        extra = f", nlist={self.nlist}, storage={self.storage}" if self._kind == "ivf" else ""
        return f"VectorIndex(kind={self._kind}, dim={self._dim}, n={len(self)}{extra})"

    def ids(self) -> NDArray[np.int64]:
        """All ids in the index, ascending."""
        with self._lock.read():
            return np.sort(self._ids_unlocked())

    def needs_rebuild(self) -> bool:
        """Whether the layout no longer fits the size (or config); the owner then calls build().

        True when a flat index outgrew ``exact_max``; when an IVF index shrank to at most half
        of ``exact_max`` (a few hundred tiny lists would be slower and less exact than a scan);
        when an IVF index with an automatic ``nlist`` holds more than 4x the size its ``nlist``
        was designed for (lists 4x longer than planned: slower searches); or when its storage
        differs from ``config.ivf_storage``.
        """
        n = len(self)
        cfg = self._config
        if self._kind == "flat":
            return n > cfg.exact_max
        if n <= cfg.exact_max // 2 or self.storage != cfg.ivf_storage:
            return True
        nlist = int(self._index.nlist)
        return cfg.nlist is None and n > _IVF_STALE_GROWTH * _designed_size(nlist)

    # ------------------------------------------------------------------ writes

    def add(self, ids: ArrayLike, vectors: ArrayLike) -> int:
        """Insert vectors; an id already present is replaced, never duplicated.

        Args:
            ids: ``(n,)`` distinct non-negative integer ids.
            vectors: ``(n, dim)`` floating point vectors (normalised copies are stored).

        Returns:
            How many of the ids replaced an existing entry.

        Raises:
            ValueError: On bad shapes, dtypes, duplicate or negative ids, zero or non-finite
                vectors.
        """
        id_arr = _as_ids(ids)
        x = _as_unit_vectors(vectors, self._dim, "vectors")
        if x.shape[0] != id_arr.shape[0]:
            raise ValueError(f"{id_arr.shape[0]} ids but {x.shape[0]} vectors")
        if id_arr.size == 0:
            return 0
        if np.unique(id_arr).size != id_arr.size:
            raise ValueError("ids must be distinct within one add() call")
        _apply_threads(self._config.threads)
        # FAISS's own assignment here, not _assign: for the few vectors of an incremental add it
        # runs single-threaded SIMD code, whereas numpy's multi-threaded BLAS waits on a busy
        # 2-core machine for its second thread (measured: 40 us -> 12 ms for one vector).
        lists = self._quantizer.assign(x, 1).ravel() if self._quantizer is not None else None
        with self._lock.write():
            if lists is None:
                # Flat: only remove what is present; IDMap2.remove_ids always scans and rebuilds
                # its reverse map, which would make every plain insert O(n).
                present = id_arr[self._present_mask(id_arr)]
                replaced = int(self._index.remove_ids(present)) if present.size else 0
                self._index.add_with_ids(x, id_arr)
            else:
                # IVF: hash-table removal of absent ids is a cheap no-op, so just remove.
                replaced = int(self._index.remove_ids(id_arr))
                add_preassigned(self._index, x, lists, id_arr)
            self._gpu_stale = True
        return replaced

    def remove(self, ids: ArrayLike) -> int:
        """Delete ids (absent ones are ignored) and return how many were actually removed."""
        id_arr = np.unique(_as_ids(ids))
        if id_arr.size == 0:
            return 0
        _apply_threads(self._config.threads)
        with self._lock.write():
            if self._kind == "flat":
                id_arr = id_arr[self._present_mask(id_arr)]
                if id_arr.size == 0:
                    return 0
            removed = int(self._index.remove_ids(id_arr))
            if removed:
                self._gpu_stale = True
        return removed

    # ------------------------------------------------------------------ search

    def search(
        self,
        queries: ArrayLike,
        k: int,
        exclude_ids: Iterable[int] | None = None,
        min_score: float | None = None,
    ) -> list[list[tuple[int, float]]]:
        """Nearest neighbours by cosine similarity.

        Args:
            queries: ``(q, dim)`` or ``(dim,)`` floating point vectors (normalised internally).
            k: Maximum hits per query; more than the index holds returns what exists.
            exclude_ids: Ids never to return; the search over-fetches so that up to ``k`` other
                hits still come back.
            min_score: Drop hits whose cosine similarity is below this.

        Returns:
            One list per query of ``(id, score)``, best first.

        Raises:
            ValueError: On a bad ``k`` or query shape, dtype or value.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        x = _as_unit_vectors(q, self._dim, "queries")
        excluded: set[int] = set()
        if exclude_ids is not None:
            excluded = set(_as_ids(np.asarray(list(exclude_ids)), "exclude_ids").tolist())
        if x.shape[0] == 0:
            return []
        _apply_threads(self._config.threads)
        with self._lock.read():
            ntotal = int(self._index.ntotal)
            if ntotal == 0:
                return [[] for _ in range(x.shape[0])]
            # Over-fetch by the exclusion count rather than an IDSelector: the same code then
            # works for GPU indexes, and exclusion lists are small (the clip itself, a few more).
            fetch = min(ntotal, int(k) + len(excluded))
            if self._gpu:
                with self._gpu_lock:
                    scores, labels = self._gpu_replica().search(x, min(fetch, _GPU_MAX_K))
            else:
                scores, labels = self._index.search(x, fetch)
        results: list[list[tuple[int, float]]] = []
        for row_scores, row_ids in zip(scores.tolist(), labels.tolist(), strict=True):
            hits: list[tuple[int, float]] = []
            for score, idx in zip(row_scores, row_ids, strict=True):
                if idx < 0 or idx in excluded:  # -1: FAISS padding when fewer than fetch exist
                    continue
                if min_score is not None and score < min_score:
                    break  # results are sorted, nothing later can pass
                hits.append((idx, score))
                if len(hits) == k:
                    break
            results.append(hits)
        return results

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index atomically: temp file in the same folder, fsync, rename.

        The file is the FAISS index alone (ids included); readers of ``path`` see either the old
        or the new complete file, never a partial one.
        """
        # The write into the page cache needs a consistent index (read lock: searches go on,
        # writers wait). Contexts exit in reverse order, so the lock is released before
        # atomic_path's slow fsync and rename.
        with atomic_path(path, durable=True) as tmp, self._lock.read():
            faiss.write_index(self._index, str(tmp))

    def to_bytes(self) -> bytes:
        """The index serialised (ids included), for a snapshot stored elsewhere.

        Only the copy into memory holds the read lock (searches go on; changes wait for the
        copy, not for whatever is done with the bytes afterwards).
        """
        with self._lock.read():
            return faiss.serialize_index(self._index).tobytes()

    @classmethod
    def from_bytes(
        cls, data: bytes, config: IndexConfig | None = None, origin: str = ""
    ) -> VectorIndex:
        """Read an index serialised by :meth:`to_bytes` (``origin`` names it in errors)."""
        config = config or IndexConfig()
        _apply_threads(config.threads)
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except (RuntimeError, MemoryError) as exc:
            raise IndexCorrupt(f"cannot read index {origin}: {exc}") from exc
        return cls._checked(index, config, Path(origin))

    @classmethod
    def load(cls, path: str | os.PathLike[str], config: IndexConfig | None = None) -> VectorIndex:
        """Read an index written by :meth:`save`.

        ``config`` supplies search settings (``nprobe``, GPU, threads) and the thresholds of
        :meth:`needs_rebuild`; the layout is whatever the file holds.

        Raises:
            IndexCorrupt: When the file is missing, truncated, unreadable, or not an
                inner-product index of a layout this class writes.
        """
        config = config or IndexConfig()
        path = Path(path)
        if not path.is_file():
            raise IndexCorrupt(f"index file {path} does not exist")
        _apply_threads(config.threads)
        try:
            index = faiss.read_index(str(path))
        except (RuntimeError, MemoryError) as exc:  # FAISS reports short reads as RuntimeError
            raise IndexCorrupt(f"cannot read index file {path}: {exc}") from exc
        return cls._checked(index, config, path)

    @classmethod
    def _checked(cls, index: faiss.Index, config: IndexConfig, path: Path) -> VectorIndex:
        cls._check_layout(index, path)
        if index.d < 1:
            raise IndexCorrupt(f"index file {path} has dimension {index.d}")
        if isinstance(index, faiss.IndexIVF) and index.direct_map.type != faiss.DirectMap.Hashtable:
            index.set_direct_map_type(faiss.DirectMap.Hashtable)  # foreign file: enable removal
        loaded = cls(index, config)
        ids = loaded._ids_unlocked()
        if ids.size != index.ntotal or np.unique(ids).size != ids.size or (ids < 0).any():
            raise IndexCorrupt(f"index file {path} has inconsistent or duplicate ids")
        return loaded

    @staticmethod
    def _check_layout(index: faiss.Index, path: Path) -> None:
        ip = faiss.METRIC_INNER_PRODUCT
        if isinstance(index, faiss.IndexIDMap2):
            inner = faiss.downcast_index(index.index)
            ok = isinstance(inner, faiss.IndexFlat) and inner.metric_type == ip
            ok = ok and index.id_map.size() == index.ntotal == inner.ntotal
        elif isinstance(index, (faiss.IndexIVFFlat, faiss.IndexIVFScalarQuantizer)):
            quantizer = faiss.downcast_index(index.quantizer)
            ok = (
                index.metric_type == ip
                and isinstance(quantizer, faiss.IndexFlat)
                and quantizer.ntotal == index.nlist
                and index.is_trained
            )
            if isinstance(index, faiss.IndexIVFScalarQuantizer):
                ok = ok and index.sq.qtype == faiss.ScalarQuantizer.QT_8bit
        else:
            ok = False
        if not ok:
            raise IndexCorrupt(f"index file {path} does not hold a layout VectorIndex writes")

    # ------------------------------------------------------------------ internals (lock held)

    def _has(self, item: int) -> bool:
        # FAISS exposes no membership test; its id maps (IDMap2's reverse map, IVF's hash-table
        # direct map) throw on a missing key, which is still O(1) and avoids a second id set.
        try:
            if self._kind == "flat":
                self._index.reconstruct(item)
            else:
                self._index.direct_map.get(item)
        except RuntimeError:
            return False
        return True

    def _present_mask(self, ids: NDArray[np.int64]) -> NDArray[np.bool_]:
        if ids.size <= 256:
            return np.fromiter((self._has(int(i)) for i in ids), dtype=bool, count=ids.size)
        return np.isin(ids, self._ids_unlocked())

    def _ids_unlocked(self) -> NDArray[np.int64]:
        if self._kind == "flat":
            return faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)
        invlists = self._index.invlists
        parts = []
        for list_no in range(invlists.nlist):
            size = invlists.list_size(list_no)
            if size:
                ptr = invlists.get_ids(list_no)
                parts.append(faiss.rev_swig_ptr(ptr, size).copy())
                invlists.release_ids(list_no, ptr)
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def _gpu_replica(self) -> Any:
        if self._gpu_stale or self._gpu_index is None:
            self._gpu_index = faiss.index_cpu_to_gpu(_shared_gpu_resources(), 0, self._index)
            if self._kind == "ivf":
                self._gpu_index.nprobe = self._index.nprobe
            self._gpu_stale = False
        return self._gpu_index
