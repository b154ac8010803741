"""Memory-bank vector search: build time, single-query latency, recall@5 and bytes per entry.

Synthetic entries with the default caption embedder's dimension (384, all-MiniLM-L6-v2). Caption
embeddings are clustered (many captions paraphrase a few scenes), so the data is a mixture of
gaussians on the unit sphere rather than uniform random unit vectors, which are a pessimistic,
unrealistic case for IVF: ``x = normalise(c + sigma * g / sqrt(dim))`` with ``c`` one of
``--centers`` (default 1000) random unit centres and ``g`` standard normal noise. With the
default sigma = 0.8 an entry has cosine ~0.78 to its centre, ~0.61 to another entry of the same
cluster and ~0 (+-0.05) to entries of other clusters: the true neighbours are "same scene"
entries, with similarities like those of related captions. ``--centers 0`` gives uniform random
unit vectors, the unclustered worst case. Queries are held-out points from the same distribution.

For each size the index type is what ``VectorIndex.build`` chooses with the default
``IndexConfig`` (flat up to 50K entries, IVF above). Latency is one query at a time with k = 5,
as the service searches, through ``VectorIndex.search``, after untimed warm-up queries; recall@5
is against exact brute force (numpy, in chunks). At sizes >= ``--compare-min`` an IVF index is
also measured with the other storage (sq8) and as an exact flat scan; every index also gets an
interleaved 1 vs 2 faiss threads latency comparison.

    python -m bench.bank_search                     # 10K, 50K, 100K, 1M (~7 min on 2 cores)
    python -m bench.bank_search --sizes 10000 100000 --no-flat-compare
    python -m bench.bank_search --sizes 1000000 --nprobe-sweep 8 16 32 64 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from memory_bank.index import IndexConfig, VectorIndex

DIM = 384  # all-MiniLM-L6-v2
K = 5
DEFAULT_OUT = (
    Path(__file__).resolve().parents[1] / "docs" / "bench-results" / "bank_search_cpu.json"
)


def clustered_unit_vectors(
    n: int, centers: np.ndarray, sigma: float, rng: np.random.Generator, chunk: int = 131_072
) -> np.ndarray:
    """``n`` points of the gaussian mixture, L2-normalised, generated in chunks (float32).

    With no centres (``--centers 0``) the points are uniform random unit vectors, the
    unclustered worst case for IVF.
    """
    dim = centers.shape[1]
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        block = rng.standard_normal((stop - start, dim), dtype=np.float32)
        if centers.shape[0]:
            block *= sigma / np.sqrt(dim)
            block += centers[rng.integers(0, centers.shape[0], size=stop - start)]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:stop] = block
    return out


def exact_top_k(db: np.ndarray, queries: np.ndarray, k: int, chunk: int = 32_768) -> np.ndarray:
    """Ids (row numbers) of the exact top-k inner products, best first, by chunked BLAS."""
    nq = queries.shape[0]
    best_s = np.full((nq, k), -np.inf, dtype=np.float32)
    best_i = np.zeros((nq, k), dtype=np.int64)
    for start in range(0, db.shape[0], chunk):
        scores = queries @ db[start : start + chunk].T
        kk = min(k, scores.shape[1])
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([best_s, np.take_along_axis(scores, part, axis=1)], axis=1)
        cand_i = np.concatenate([best_i, part + start], axis=1)
        top = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(cand_s, top, axis=1)
        best_i = np.take_along_axis(cand_i, top, axis=1)
    return best_i


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def latency_and_recall(
    index: VectorIndex, queries: np.ndarray, truth: np.ndarray, warmup: np.ndarray
) -> dict:
    """Time one k=5 query at a time; recall@5 of the same results against ``truth``.

    ``warmup`` queries run first, untimed, from the same distribution but not in ``queries``.
    """
    for q in warmup:
        index.search(q, K)
    times = np.empty(queries.shape[0])
    hits = 0
    for i, q in enumerate(queries):
        t0 = time.perf_counter_ns()
        result = index.search(q, K)[0]
        times[i] = (time.perf_counter_ns() - t0) / 1e6
        hits += len({idx for idx, _ in result} & set(truth[i].tolist()))
    return {
        "queries": int(queries.shape[0]),
        "p50_ms": round(float(np.percentile(times, 50)), 4),
        "p99_ms": round(float(np.percentile(times, 99)), 4),
        "mean_ms": round(float(times.mean()), 4),
        "recall_at_5": round(hits / (K * queries.shape[0]), 4),
    }


def threads_compare(
    index: VectorIndex, queries: np.ndarray, warmup: np.ndarray, config: IndexConfig
) -> dict:
    """Single-query latency with 1 vs 2 faiss threads, interleaved in blocks of 100 queries so
    that load from other processes on the machine affects both alike."""
    variants = {
        t: VectorIndex(index._index, config.model_copy(update={"threads": t})) for t in (1, 2)
    }
    times: dict[int, list[float]] = {1: [], 2: []}
    for start in range(0, queries.shape[0], 100):
        for threads, variant in variants.items():
            for q in warmup[:5]:
                variant.search(q, K)
            for q in queries[start : start + 100]:
                t0 = time.perf_counter_ns()
                variant.search(q, K)
                times[threads].append((time.perf_counter_ns() - t0) / 1e6)
    return {
        f"threads_{t}": {
            "p50_ms": round(float(np.percentile(v, 50)), 4),
            "p99_ms": round(float(np.percentile(v, 99)), 4),
        }
        for t, v in times.items()
    }


def measure(
    n: int,
    db: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    warmup: np.ndarray,
    config: IndexConfig,
    args: argparse.Namespace,
    timed_queries: int | None = None,
) -> dict:
    """Build one index over ``db`` and measure it: build, latency, recall, bytes per entry."""
    ids = np.arange(n, dtype=np.int64)  # ids == row numbers, so ground truth compares directly
    gc.collect()
    rss0 = rss_bytes()
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    index = VectorIndex.build(DIM, ids, db, config)
    build_s = time.perf_counter() - t0
    gc.collect()
    rss_growth = rss_bytes() - rss0
    row: dict = {
        "n": n,
        "kind": index.kind,
        "nlist": index.nlist,
        "nprobe": config.nprobe if index.kind == "ivf" else None,
        "storage": index.storage,
        "threads": config.threads,
        "build_s": round(build_s, 2),
    }
    nq = timed_queries or queries.shape[0]
    row.update(latency_and_recall(index, queries[:nq], truth[:nq], warmup[: max(nq // 10, 5)]))
    if args.threads_compare:
        row["threads_compare"] = threads_compare(index, queries[:nq], warmup[:20], config)
    # Bytes the index occupies: its serialised form (vectors, ids, centroids, id map). The live
    # process also holds hash tables for the id maps, which the RSS growth column includes.
    row["ram_bytes_per_entry"] = round(faiss.serialize_index(index._index).size / n, 1)
    row["rss_growth_bytes_per_entry"] = round(rss_growth / n, 1)
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        path = Path(tmp) / "bank.faiss"
        t0 = time.perf_counter()
        index.save(path)
        row["save_s"] = round(time.perf_counter() - t0, 2)
        row["disk_bytes_per_entry"] = round(path.stat().st_size / n, 1)
        t0 = time.perf_counter()
        VectorIndex.load(path, config)
        row["load_s"] = round(time.perf_counter() - t0, 2)
    gc.collect()
    if args.nprobe_sweep and index.kind == "ivf":
        sweep = []
        for nprobe in args.nprobe_sweep:
            index._index.nprobe = min(nprobe, index.nlist)  # tuning only: poke the FAISS knob
            sweep.append({"nprobe": nprobe, **latency_and_recall(index, queries, truth, warmup)})
            print(json.dumps(sweep[-1]), file=sys.stderr)
        row["nprobe_sweep"] = sweep
    # Other processes share the 2 cores; record how busy the machine was while measuring.
    row["loadavg_1min"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    return row


def run_size(
    n: int,
    data: np.ndarray,
    queries: np.ndarray,
    warmup: np.ndarray,
    config: IndexConfig,
    args: argparse.Namespace,
) -> dict:
    db = data[:n]
    t0 = time.perf_counter()
    truth = exact_top_k(db, queries, K)
    truth_s = time.perf_counter() - t0
    row = measure(n, db, queries, truth, warmup, config, args)
    row["ground_truth_s"] = round(truth_s, 2)
    print(json.dumps(row), file=sys.stderr)
    if n >= args.compare_min and row["kind"] == "ivf":
        if args.sq8_compare:
            other = "sq8" if config.ivf_storage == "flat" else "flat"
            cfg = config.model_copy(update={"ivf_storage": other})
            row["ivf_" + other] = measure(n, db, queries, truth, warmup, cfg, args)
            print(json.dumps(row["ivf_" + other]), file=sys.stderr)
        if args.flat_compare:
            # Exact scan of everything: ~0.1 s a query at 1M, so fewer timed queries.
            cfg = config.model_copy(update={"exact_max": n})
            row["flat_exact"] = measure(n, db, queries, truth, warmup, cfg, args, args.flat_queries)
            print(json.dumps(row["flat_exact"]), file=sys.stderr)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000, 1_000_000]
    )
    parser.add_argument("--queries", type=int, default=2_000, help="timed held-out queries")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--centers", type=int, default=1_000)
    parser.add_argument("--sigma", type=float, default=0.8, help="noise norm around a centre")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nprobe", type=int, help="override IndexConfig.nprobe")
    parser.add_argument("--nlist", type=int, help="override IndexConfig.nlist")
    parser.add_argument("--storage", choices=["flat", "sq8"], help="override ivf_storage")
    parser.add_argument("--threads", type=int, help="override IndexConfig.threads")
    parser.add_argument("--nprobe-sweep", type=int, nargs="*", default=[])
    parser.add_argument(
        "--no-flat-compare",
        dest="flat_compare",
        action="store_false",
        help="skip the exact flat index at sizes >= --compare-min",
    )
    parser.add_argument(
        "--no-sq8-compare",
        dest="sq8_compare",
        action="store_false",
        help="skip the other IVF storage at sizes >= --compare-min",
    )
    parser.add_argument("--compare-min", type=int, default=1_000_000)
    parser.add_argument(
        "--no-threads-compare",
        dest="threads_compare",
        action="store_false",
        help="skip the interleaved 1 vs 2 faiss threads latency comparison",
    )
    parser.add_argument("--flat-queries", type=int, default=200, help="flat scans are slow")
    parser.add_argument("--tmp-dir", default=None, help="where the saved index is written")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    overrides = {
        key: value
        for key, value in {
            "nprobe": args.nprobe,
            "nlist": args.nlist,
            "ivf_storage": args.storage,
            "threads": args.threads,
        }.items()
        if value is not None
    }
    config = IndexConfig(**overrides)
    rng = np.random.default_rng(args.seed)
    centers = rng.standard_normal((args.centers, DIM), dtype=np.float32)
    centers /= np.maximum(np.linalg.norm(centers, axis=1, keepdims=True), 1e-12)
    t0 = time.perf_counter()
    # One stream; each size uses a prefix, so the sizes share their data.
    data = clustered_unit_vectors(max(args.sizes), centers, args.sigma, rng)
    queries = clustered_unit_vectors(args.queries, centers, args.sigma, rng)
    warmup = clustered_unit_vectors(args.warmup, centers, args.sigma, rng)
    gen_s = time.perf_counter() - t0

    report: dict = {
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "faiss": faiss.__version__,
            "faiss_simd": faiss.get_compile_options().strip(),
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "data": {
            "dim": DIM,
            "centers": args.centers,
            "sigma": args.sigma,
            "queries": args.queries,
            "warmup": args.warmup,
            "k": K,
            "seed": args.seed,
            "generate_s": round(gen_s, 1),
        },
        "config": config.model_dump(),
        "results": [],
    }
    for n in sorted(args.sizes):
        row = run_size(n, data, queries, warmup, config, args)
        report["results"].append(row)
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
