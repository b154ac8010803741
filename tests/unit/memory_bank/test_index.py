"""VectorIndex: exactness, id semantics, persistence, rebuild policy, threads, IVF recall."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from memory_bank.errors import IndexCorrupt
from memory_bank.index import IndexConfig, VectorIndex, _gpu_available, _spherical_kmeans

DIM = 32
SMALL_IVF = IndexConfig(exact_max=200)  # ~2k vectors then build an IVF


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def brute_force(db: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int):
    scores = unit(queries) @ unit(db).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(scores, order, axis=1)


def clustered(rng: np.random.Generator, n: int, dim: int, centers: np.ndarray, sigma: float):
    labels = rng.integers(0, centers.shape[0], size=n)
    x = centers[labels] + rng.standard_normal((n, dim)) * sigma / np.sqrt(dim)
    return unit(x).astype(np.float32)


def recall_at_5(results: list[list[tuple[int, float]]], truth: np.ndarray) -> float:
    found = [
        len({i for i, _ in hits} & set(t.tolist())) for hits, t in zip(results, truth, strict=True)
    ]
    return float(np.mean(found)) / 5


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def data(rng):
    ids = rng.permutation(10_000)[:2_000].astype(np.int64) * 3 + 5  # sparse, unordered ids
    vectors = rng.standard_normal((2_000, DIM)).astype(np.float32)
    return ids, vectors


@pytest.fixture(params=["flat", "ivf", "ivf-sq8"])
def any_index(request, data) -> VectorIndex:
    ids, vectors = data
    config = {
        "flat": IndexConfig(),
        "ivf": SMALL_IVF,
        "ivf-sq8": IndexConfig(exact_max=200, ivf_storage="sq8"),
    }[request.param]
    index = VectorIndex.build(DIM, ids, vectors, config)
    assert index.kind == ("flat" if request.param == "flat" else "ivf")
    return index


def all_ids(index: VectorIndex, queries: np.ndarray) -> set[int]:
    return {i for hits in index.search(queries, len(index) + 10) for i, _ in hits}


# ---------------------------------------------------------------- exactness


def test_flat_equals_numpy_brute_force(rng, data):
    ids, vectors = data
    vectors = vectors * rng.uniform(0.1, 10, size=(len(vectors), 1)).astype(np.float32)
    index = VectorIndex.build(DIM, ids, vectors)
    queries = rng.standard_normal((25, DIM)).astype(np.float32)
    got = index.search(queries, 10)
    want_ids, want_scores = brute_force(vectors, ids, queries, 10)
    assert index.kind == "flat"
    for hits, w_ids, w_scores in zip(got, want_ids, want_scores, strict=True):
        assert [i for i, _ in hits] == w_ids.tolist()
        np.testing.assert_allclose([s for _, s in hits], w_scores, atol=1e-5)
        assert all(isinstance(i, int) and isinstance(s, float) for i, s in hits)


def test_single_query_vector_and_result_order(data):
    ids, vectors = data
    index = VectorIndex.build(DIM, ids, vectors)
    hits = index.search(vectors[7], 5)
    assert len(hits) == 1
    assert hits[0][0][0] == ids[7]
    assert hits[0][0][1] == pytest.approx(1.0, abs=1e-5)
    scores = [s for _, s in hits[0]]
    assert scores == sorted(scores, reverse=True)


def test_scaled_vectors_give_same_results_and_inputs_untouched(rng, data):
    ids, vectors = data
    scales = rng.uniform(0.01, 100, size=(len(vectors), 1)).astype(np.float32)
    scaled = vectors * scales
    before = scaled.copy()
    queries = rng.standard_normal((10, DIM)).astype(np.float32)
    a = VectorIndex.build(DIM, ids, vectors).search(queries, 5)
    b_index = VectorIndex.build(DIM, ids, scaled)
    b = b_index.search(queries * 42.0, 5)
    assert [[i for i, _ in h] for h in a] == [[i for i, _ in h] for h in b]
    np.testing.assert_allclose(
        [[s for _, s in h] for h in a], [[s for _, s in h] for h in b], atol=1e-5
    )
    np.testing.assert_array_equal(scaled, before)  # caller array never normalised in place
    b_index.add([10**9], scaled[:1])
    np.testing.assert_array_equal(scaled, before)


def test_float64_and_float16_inputs_are_accepted(data):
    ids, vectors = data
    index = VectorIndex.build(DIM, ids[:50], vectors[:50].astype(np.float64))
    index.add(ids[50:60], vectors[50:60].astype(np.float16))
    assert len(index) == 60
    assert index.search(vectors[55].astype(np.float64), 1)[0][0][0] == ids[55]


# ---------------------------------------------------------------- id semantics


def test_add_replaces_existing_id_instead_of_duplicating(any_index, data, rng):
    ids, vectors = data
    n = len(any_index)
    target = int(ids[3])
    new_vector = rng.standard_normal((1, DIM)).astype(np.float32)
    assert any_index.add([target], new_vector) == 1
    assert len(any_index) == n
    top = any_index.search(new_vector, 1)[0][0]
    assert top[0] == target and top[1] == pytest.approx(1.0, abs=1e-2)
    # the old vector no longer matches the id
    old_hits = dict(any_index.search(vectors[3], len(any_index))[0])
    assert old_hits[target] < 0.9
    everything = any_index.search(vectors[:50], len(any_index))
    for hits in everything:
        assert len(hits) == len({i for i, _ in hits}) == n


def test_add_new_id_returns_zero_and_mixed_batch_counts_replacements(any_index, data, rng):
    ids, _ = data
    n = len(any_index)
    fresh = rng.standard_normal((3, DIM)).astype(np.float32)
    assert any_index.add([1, 2, int(ids[0])], fresh) == 1
    assert len(any_index) == n + 2
    assert 1 in any_index and 2 in any_index


def test_remove_counts_and_removed_ids_never_return(any_index, data):
    ids, vectors = data
    n = len(any_index)
    gone = ids[:100]
    # duplicates and absent ids are not counted
    assert any_index.remove(np.concatenate([gone, gone[:5], [999_999_999]])) == 100
    assert len(any_index) == n - 100
    assert any_index.remove(gone) == 0
    assert not set(gone.tolist()) & all_ids(any_index, vectors[:100])
    assert int(gone[0]) not in any_index
    assert set(any_index.ids().tolist()) == set(ids[100:].tolist())
    # re-adding works and is visible
    any_index.add(gone[:10], vectors[:10])
    assert len(any_index) == n - 90
    assert any_index.search(vectors[4], 1)[0][0][0] == gone[4]


def test_ids_sorted_and_contains(any_index, data):
    ids, _ = data
    got = any_index.ids()
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, np.sort(ids))
    assert int(ids[0]) in any_index
    assert np.int64(ids[1]) in any_index
    assert 4 not in any_index  # ids are 2 mod 3
    assert "x" not in any_index and None not in any_index and True not in any_index


def test_large_batch_add_with_replacements(data, rng):
    ids, vectors = data
    index = VectorIndex.build(DIM, ids[:1000], vectors[:1000])
    # > 256 ids: the vectorised membership path
    batch_ids = np.concatenate([ids[500:1000], ids[1000:1500]])
    assert index.add(batch_ids, vectors[500:1500]) == 500
    assert len(index) == 1500
    np.testing.assert_array_equal(index.ids(), np.sort(ids[:1500]))


# ---------------------------------------------------------------- search options


def test_exclude_ids_still_returns_k(any_index, data):
    ids, vectors = data
    plain = any_index.search(vectors[0], 5)[0]
    excluded = [i for i, _ in plain[:3]]
    hits = any_index.search(vectors[0], 5, exclude_ids=excluded)[0]
    assert len(hits) == 5
    assert not set(excluded) & {i for i, _ in hits}
    assert [i for i, _ in hits[:2]] == [i for i, _ in plain[3:5]]
    # numpy arrays and sets are accepted
    hits_np = any_index.search(vectors[0], 5, exclude_ids=np.array(excluded))[0]
    assert hits_np == any_index.search(vectors[0], 5, exclude_ids=set(excluded))[0] == hits


def test_min_score_drops_low_hits(any_index, data):
    ids, vectors = data
    hits = any_index.search(vectors[:3], 50)
    threshold = hits[0][25][1]  # between the scores that come back
    filtered = any_index.search(vectors[:3], 50, min_score=threshold)
    for full, cut in zip(hits, filtered, strict=True):
        assert cut == [h for h in full if h[1] >= threshold]
    assert 25 <= len(filtered[0]) < 50
    assert any_index.search(vectors[0], 5, min_score=1.5) == [[]]


def test_k_larger_than_size_returns_what_exists(data):
    ids, vectors = data
    index = VectorIndex.build(DIM, ids[:7], vectors[:7])
    hits = index.search(vectors[:2], 100)
    assert [len(h) for h in hits] == [7, 7]
    assert {i for i, _ in hits[0]} == set(ids[:7].tolist())
    assert len(index.search(vectors[0], 100, exclude_ids=ids[:2])[0]) == 5


def test_ivf_padding_is_dropped(data):
    ids, vectors = data
    index = VectorIndex.build(DIM, ids, vectors, IndexConfig(exact_max=200, nprobe=1))
    hits = index.search(vectors[:5], len(ids))
    valid = set(ids.tolist())
    for h in hits:
        assert 0 < len(h) < len(ids)  # one list probed: FAISS pads the rest with -1
        assert {i for i, _ in h} <= valid


def test_kmeans_reseeds_empty_lists(rng):
    # 3 distinct points and 8 centroids: most lists start or end up empty
    points = unit(rng.standard_normal((3, DIM))).astype(np.float32)
    x = np.repeat(points, 100, axis=0)
    centroids = _spherical_kmeans(x, 8, 5, np.random.default_rng(0))
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)


def test_empty_index():
    index = VectorIndex.empty(DIM)
    q = np.ones((3, DIM), dtype=np.float32)
    assert len(index) == 0 and index.kind == "flat" and index.dim == DIM
    assert index.search(q, 5) == [[], [], []]
    assert index.search(q[0], 5) == [[]]
    assert index.search(np.empty((0, DIM), np.float32), 5) == []
    assert index.remove([1, 2]) == 0
    assert index.ids().size == 0
    assert 1 not in index
    assert not index.needs_rebuild()
    assert index.add([], np.empty((0, DIM), np.float32)) == 0
    index.add([1], q[:1])
    assert index.search(q[0], 5)[0][0][0] == 1
    assert VectorIndex.build(DIM, [], np.empty((0, DIM), np.float32)).kind == "flat"


# ---------------------------------------------------------------- persistence


@pytest.mark.parametrize("storage", ["flat", "sq8"])
@pytest.mark.parametrize("exact_max", [50_000, 200], ids=["flat", "ivf"])
def test_save_load_round_trip(tmp_path: Path, data, rng, exact_max, storage):
    ids, vectors = data
    config = IndexConfig(exact_max=exact_max, ivf_storage=storage)
    index = VectorIndex.build(DIM, ids, vectors, config)
    index.remove(ids[:10])
    index.add([77], vectors[:1])
    queries = rng.standard_normal((30, DIM)).astype(np.float32)
    path = tmp_path / "bank.faiss"
    index.save(path)
    loaded = VectorIndex.load(path, config)
    assert (loaded.kind, loaded.dim, len(loaded), loaded.nlist, loaded.storage) == (
        index.kind,
        index.dim,
        len(index),
        index.nlist,
        index.storage,
    )
    assert loaded.search(queries, 10) == index.search(queries, 10)
    np.testing.assert_array_equal(loaded.ids(), index.ids())
    # only the index file, no temp files left behind
    assert [p.name for p in tmp_path.iterdir()] == ["bank.faiss"]
    # the loaded index stays writable (IVF removal needs its hash-table direct map)
    assert loaded.remove(ids[10:20]) == 10
    assert loaded.add([int(ids[0])], vectors[:1]) == 0
    assert len(loaded) == len(index) - 9


def test_save_replaces_existing_file(tmp_path: Path, data):
    ids, vectors = data
    path = tmp_path / "bank.faiss"
    VectorIndex.build(DIM, ids[:5], vectors[:5]).save(path)
    VectorIndex.build(DIM, ids[:9], vectors[:9]).save(path)
    assert len(VectorIndex.load(path)) == 9
    assert [p.name for p in tmp_path.iterdir()] == ["bank.faiss"]


def test_load_applies_config_nprobe(tmp_path: Path, data):
    ids, vectors = data
    VectorIndex.build(DIM, ids, vectors, SMALL_IVF).save(tmp_path / "i.faiss")
    loaded = VectorIndex.load(tmp_path / "i.faiss", IndexConfig(exact_max=200, nprobe=3))
    assert loaded._index.nprobe == 3


@pytest.fixture
def saved_ivf(tmp_path: Path, data) -> Path:
    ids, vectors = data
    path = tmp_path / "bank.faiss"
    VectorIndex.build(DIM, ids, vectors, SMALL_IVF).save(path)
    return path


def test_missing_file_is_corrupt(tmp_path: Path):
    with pytest.raises(IndexCorrupt, match="does not exist"):
        VectorIndex.load(tmp_path / "nope.faiss")
    with pytest.raises(IndexCorrupt):
        VectorIndex.load(tmp_path)  # a directory


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.3, 0.7, 0.999])
def test_truncated_file_is_corrupt(saved_ivf: Path, fraction: float):
    raw = saved_ivf.read_bytes()
    saved_ivf.write_bytes(raw[: int(len(raw) * fraction)])
    with pytest.raises(IndexCorrupt):
        VectorIndex.load(saved_ivf)


def test_truncated_flat_file_is_corrupt(tmp_path: Path, data):
    ids, vectors = data
    path = tmp_path / "flat.faiss"
    VectorIndex.build(DIM, ids, vectors).save(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 8])
    with pytest.raises(IndexCorrupt):
        VectorIndex.load(path)


def test_garbage_and_header_damage_are_corrupt(saved_ivf: Path, rng):
    raw = bytearray(saved_ivf.read_bytes())
    raw[:4] = b"XXXX"  # unknown index type tag
    saved_ivf.write_bytes(bytes(raw))
    with pytest.raises(IndexCorrupt):
        VectorIndex.load(saved_ivf)
    saved_ivf.write_bytes(rng.bytes(4096))
    with pytest.raises(IndexCorrupt):
        VectorIndex.load(saved_ivf)


def test_foreign_layout_is_corrupt(tmp_path: Path, data):
    _, vectors = data
    path = tmp_path / "l2.faiss"
    l2 = faiss.IndexFlatL2(DIM)
    l2.add(vectors)
    faiss.write_index(l2, str(path))
    with pytest.raises(IndexCorrupt, match="layout"):
        VectorIndex.load(path)


# ---------------------------------------------------------------- layout and rebuild policy


def test_build_picks_layout_by_size(data):
    ids, vectors = data
    assert VectorIndex.build(DIM, ids[:200], vectors[:200], SMALL_IVF).kind == "flat"
    ivf = VectorIndex.build(DIM, ids[:201], vectors[:201], SMALL_IVF)
    assert ivf.kind == "ivf" and ivf.nlist is not None
    assert VectorIndex.build(DIM, ids, vectors, IndexConfig(exact_max=200, nlist=8)).nlist == 8


@pytest.mark.parametrize("n", [201, 1_000, 2_000])
def test_fresh_build_never_needs_rebuild(data, n):
    ids, vectors = data
    assert not VectorIndex.build(DIM, ids[:n], vectors[:n], SMALL_IVF).needs_rebuild()


def test_needs_rebuild_transitions(data, rng):
    ids, vectors = data
    config = IndexConfig(exact_max=100)
    index = VectorIndex.build(DIM, ids[:100], vectors[:100], config)
    assert index.kind == "flat" and not index.needs_rebuild()
    index.add(ids[100:101], vectors[100:101])
    assert index.needs_rebuild()  # flat outgrew exact_max

    index = VectorIndex.build(DIM, ids[:1000], vectors[:1000], config)
    assert index.kind == "ivf" and not index.needs_rebuild()
    index.remove(ids[51:1000])
    assert len(index) == 51 and not index.needs_rebuild()
    index.remove(ids[50:51])
    assert index.needs_rebuild()  # IVF shrank to exact_max / 2

    # IVF growth: 1000 vectors get 16 lists (39 training points each), designed for 624
    index = VectorIndex.build(DIM, ids[:1000], vectors[:1000], config)
    assert index.nlist == 16
    extra = rng.standard_normal((1500, DIM)).astype(np.float32)
    index.add(np.arange(10**6, 10**6 + 1496), extra[:1496])
    assert len(index) == 2496 and not index.needs_rebuild()
    index.add([2 * 10**6], extra[-1:])
    assert index.needs_rebuild()  # more than 4x the designed size
    # an explicit nlist is what a rebuild would choose again, so growth alone is no reason
    pinned = VectorIndex.build(
        DIM, ids[:1000], vectors[:1000], IndexConfig(exact_max=100, nlist=16)
    )
    pinned.add(np.arange(10**6, 10**6 + 1500), extra)
    assert not pinned.needs_rebuild()


def test_needs_rebuild_on_storage_mismatch(tmp_path: Path, data):
    ids, vectors = data
    path = tmp_path / "i.faiss"
    VectorIndex.build(DIM, ids, vectors, IndexConfig(exact_max=200, ivf_storage="sq8")).save(path)
    assert not VectorIndex.load(path, IndexConfig(exact_max=200, ivf_storage="sq8")).needs_rebuild()
    assert VectorIndex.load(path, SMALL_IVF).needs_rebuild()


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("ids", "vectors", "message"),
    [
        ([1, 2], np.ones((2, DIM + 1), np.float32), "shape"),
        ([1, 2], np.ones((2, DIM, 1), np.float32), "shape"),
        ([1, 2], np.ones(DIM, np.float32), "shape"),
        ([1, 2], np.ones((2, DIM), np.int32), "floating point"),
        ([1, 2], np.full((2, DIM), np.nan, np.float32), "NaN"),
        ([1, 2], np.full((2, DIM), np.inf, np.float32), "NaN or infinite"),
        ([1, 2], np.zeros((2, DIM), np.float32), "all-zero"),
        ([1.0, 2.0], np.ones((2, DIM), np.float32), "integers"),
        ([[1, 2]], np.ones((2, DIM), np.float32), "one-dimensional"),
        ([1, -1], np.ones((2, DIM), np.float32), "non-negative"),
        (np.array([2**63], dtype=np.uint64), np.ones((1, DIM), np.float32), "int64"),
        ([1, 1], np.ones((2, DIM), np.float32), "distinct"),
        ([1, 2, 3], np.ones((2, DIM), np.float32), "3 ids but 2 vectors"),
    ],
)
def test_input_validation(ids, vectors, message):
    with pytest.raises(ValueError, match=message):
        VectorIndex.build(DIM, ids, vectors)
    index = VectorIndex.empty(DIM)
    with pytest.raises(ValueError, match=message):
        index.add(ids, vectors)
    assert len(index) == 0  # nothing half-added


def test_search_validation(data):
    ids, vectors = data
    index = VectorIndex.build(DIM, ids[:10], vectors[:10])
    for bad_k in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="k must be"):
            index.search(vectors[0], bad_k)
    with pytest.raises(ValueError, match="shape"):
        index.search(np.ones(DIM + 1, np.float32), 3)
    with pytest.raises(ValueError, match="all-zero"):
        index.search(np.zeros(DIM, np.float32), 3)
    with pytest.raises(ValueError, match="non-negative"):
        index.search(vectors[0], 3, exclude_ids=[-5])
    with pytest.raises(ValueError, match="integers"):
        index.remove(["a"])
    with pytest.raises(ValueError, match="dim"):
        VectorIndex.empty(0)


def test_config_validation_and_gpu_request():
    with pytest.raises(ValueError):
        IndexConfig(nprobe=0)
    with pytest.raises(ValueError):
        IndexConfig(ivf_storage="pq")
    with pytest.raises(ValueError):
        IndexConfig(unknown=1)
    if not _gpu_available():
        with pytest.raises(ValueError, match="GPU"):
            VectorIndex.empty(DIM, IndexConfig(use_gpu=True))
        assert VectorIndex.empty(DIM, IndexConfig(use_gpu="auto")).search(np.ones(DIM), 1) == [[]]


def test_threads_setting_is_applied_per_thread(data):
    ids, vectors = data
    index = VectorIndex.build(DIM, ids, vectors, IndexConfig(exact_max=200, threads=1))
    seen: list[int] = []

    def search_in_thread() -> None:
        index.search(vectors[0], 3)
        seen.append(faiss.omp_get_max_threads())

    worker = threading.Thread(target=search_in_thread)
    worker.start()
    worker.join()
    assert seen == [1]


# ---------------------------------------------------------------- concurrency


@pytest.mark.parametrize("exact_max", [50_000, 200], ids=["flat", "ivf"])
def test_concurrent_search_with_writer(data, rng, exact_max):
    ids, vectors = data
    index = VectorIndex.build(DIM, ids, vectors, IndexConfig(exact_max=exact_max))
    churn_ids = np.arange(10**7, 10**7 + 64)
    churn_vectors = rng.standard_normal((64, DIM)).astype(np.float32)
    valid = set(ids.tolist()) | set(churn_ids.tolist())
    stable = set(ids[32:].tolist())  # never touched by the writer
    queries = rng.standard_normal((64, DIM)).astype(np.float32)
    stop = threading.Event()
    errors: list[BaseException] = []
    counts = {"searches": 0, "writes": 0}

    def writer() -> None:
        w_rng = np.random.default_rng(7)
        try:
            while not stop.is_set():
                pick = w_rng.choice(64, size=4, replace=False)
                index.add(churn_ids[pick], churn_vectors[pick])
                index.remove(churn_ids[w_rng.choice(64, size=4, replace=False)])
                index.add(ids[:32][w_rng.choice(32, size=2, replace=False)], churn_vectors[:2])
                counts["writes"] += 1
        except BaseException as exc:  # noqa: BLE001 - surfaced by the main thread
            errors.append(exc)

    def reader(seed: int) -> None:
        r_rng = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                q = queries[r_rng.integers(64)]
                k = int(r_rng.integers(1, 20))
                for hits in index.search(q, k, exclude_ids=[int(ids[40])]):
                    got = [i for i, _ in hits]
                    assert len(got) == len(set(got)) <= k
                    assert set(got) <= valid
                    assert int(ids[40]) not in got
                    scores = [s for _, s in hits]
                    assert scores == sorted(scores, reverse=True)
                assert int(ids[100]) in index and len(index) >= len(stable)
                counts["searches"] += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader, args=(s,)) for s in range(4)
    ]
    for t in threads:
        t.start()
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors[0]
    assert counts["writes"] > 10 and counts["searches"] > 100
    assert stable <= set(index.ids().tolist())
    # the index is still consistent: every id once, len matches
    assert len(index.ids()) == len(set(index.ids().tolist())) == len(index)


# ---------------------------------------------------------------- IVF recall


def test_ivf_recall_at_5_on_clustered_data():
    """Caption embeddings are clustered; IVF with the default nprobe must keep recall >= 0.95."""
    rng = np.random.default_rng(0)
    dim = 64
    centers = unit(rng.standard_normal((200, dim)))
    db = clustered(rng, 20_000, dim, centers, sigma=0.8)
    queries = clustered(rng, 300, dim, centers, sigma=0.8)
    ids = np.arange(20_000, dtype=np.int64)
    index = VectorIndex.build(dim, ids, db, IndexConfig(exact_max=1_000))
    assert index.kind == "ivf" and index.nlist >= 256
    truth, _ = brute_force(db, ids, queries, 5)
    recall = recall_at_5(index.search(queries, 5), truth)
    assert recall >= 0.95
    # and the IVF really is approximate: one probed list loses neighbours
    index._index.nprobe = 1
    low = recall_at_5(index.search(queries, 5), truth)
    assert low < recall
