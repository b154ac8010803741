"""Where a clip's small files belong: the manifest database or one object/file each?

Every clip has memory tokens (about 6 KB for the released encoder: 2 distinct bf16 vectors of
1536 plus their counts) and a poster JPEG (a few KB). This writes ``--clips`` such pairs as

* files in the bank's sharded folder layout (today),
* rows of an SQLite table and of a PostgreSQL table (the manifest databases),
* objects in an S3-protocol server (moto's standalone server on localhost; fewer of them, it is
  slow to fill),

and reports what they cost on disk, how long writing them took, and the latency of what a
generation does: fetch the tokens of 5 random clips.

    python -m bench.bank_blobs [--clips 20000] [--s3-clips 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

TOKENS_BYTES = 6 * 1024 + 96
POSTER_BYTES = 5 * 1024
K = 5
FETCHES = 300


def _payload(index: int, size: int) -> bytes:
    return random.Random(index).randbytes(size)


def _p50_ms(fetch, ids: list[int]) -> float:
    rng = random.Random(0)
    times = []
    for _ in range(FETCHES):
        chosen = rng.sample(ids, K)
        started = time.perf_counter()
        fetch(chosen)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def _disk_kib(path: Path) -> int:
    return int(subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True,
                              check=True).stdout.split()[0])  # fmt: skip


def bench_files(root: Path, n: int) -> dict:
    kinds = (("tokens", TOKENS_BYTES, "safetensors"), ("posters", POSTER_BYTES, "jpg"))
    started = time.perf_counter()
    for i in range(n):
        for kind, size, ext in kinds:
            folder = root / kind / f"{i % 256:02x}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}.{ext}").write_bytes(_payload(i, size))
    written = time.perf_counter() - started

    def fetch(ids: list[int]) -> None:
        for i in ids:
            (root / "tokens" / f"{i % 256:02x}" / f"{i}.safetensors").read_bytes()

    return {"files": 2 * n, "disk_kib": _disk_kib(root), "write_s": written,
            "fetch5_p50_ms": _p50_ms(fetch, list(range(n)))}  # fmt: skip


def bench_sqlite(path: Path, n: int) -> dict:
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE blobs (clip_id INTEGER PRIMARY KEY, tokens BLOB, poster BLOB)")
    started = time.perf_counter()
    for start in range(0, n, 1000):
        rows = [(i, _payload(i, TOKENS_BYTES), _payload(i, POSTER_BYTES))
                for i in range(start, min(n, start + 1000))]  # fmt: skip
        with db:
            db.executemany("INSERT INTO blobs VALUES (?, ?, ?)", rows)
    written = time.perf_counter() - started
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def fetch(ids: list[int]) -> None:
        marks = ",".join("?" * len(ids))
        db.execute(f"SELECT tokens FROM blobs WHERE clip_id IN ({marks})", ids).fetchall()

    result = {"files": 1, "disk_kib": path.stat().st_size // 1024, "write_s": written,
              "fetch5_p50_ms": _p50_ms(fetch, list(range(n)))}  # fmt: skip
    db.close()
    return result


def bench_postgres(n: int) -> dict:
    import psycopg

    admin_url = "postgresql://postgres@127.0.0.1:5432/postgres"
    name = f"ditmem_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        with psycopg.connect(admin_url.rsplit("/", 1)[0] + f"/{name}") as db:
            db.execute(
                "CREATE TABLE blobs (clip_id BIGINT PRIMARY KEY, tokens BYTEA, poster BYTEA)"
            )
            started = time.perf_counter()
            with db.cursor() as cursor:
                for start in range(0, n, 1000):
                    rows = [(i, _payload(i, TOKENS_BYTES), _payload(i, POSTER_BYTES))
                            for i in range(start, min(n, start + 1000))]  # fmt: skip
                    cursor.executemany("INSERT INTO blobs VALUES (%s, %s, %s)", rows)
                    db.commit()
            written = time.perf_counter() - started
            size = db.execute("SELECT pg_total_relation_size('blobs')").fetchone()[0]

            def fetch(ids: list[int]) -> None:
                db.execute("SELECT tokens FROM blobs WHERE clip_id = ANY(%s)", (ids,)).fetchall()

            return {"files": 1, "disk_kib": size // 1024, "write_s": written,
                    "fetch5_p50_ms": _p50_ms(fetch, list(range(n)))}  # fmt: skip
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def bench_s3(n: int) -> dict:
    import boto3

    port = 5000 + os.getpid() % 1000
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = boto3.client(
            "s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
            aws_access_key_id="bench", aws_secret_access_key="bench",
        )  # fmt: skip
        for _ in range(100):
            try:
                client.create_bucket(Bucket="bank")
                break
            except Exception:
                time.sleep(0.1)
        started = time.perf_counter()
        for i in range(n):
            client.put_object(Bucket="bank", Key=f"tokens/{i}", Body=_payload(i, TOKENS_BYTES))
            client.put_object(Bucket="bank", Key=f"posters/{i}", Body=_payload(i, POSTER_BYTES))
        written = time.perf_counter() - started

        def fetch(ids: list[int]) -> None:
            for i in ids:
                client.get_object(Bucket="bank", Key=f"tokens/{i}")["Body"].read()

        return {"files": 2 * n, "disk_kib": None, "write_s": written,
                "fetch5_p50_ms": _p50_ms(fetch, list(range(n)))}  # fmt: skip
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=20_000)
    parser.add_argument("--s3-clips", type=int, default=2_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        results = {
            "files": bench_files(Path(scratch) / "bank", args.clips),
            "sqlite": bench_sqlite(Path(scratch) / "blobs.sqlite3", args.clips),
            "postgresql": bench_postgres(args.clips),
            "s3 (moto, localhost)": bench_s3(args.s3_clips),
        }
    payload = args.clips * (TOKENS_BYTES + POSTER_BYTES) // 1024
    print(f"{args.clips} clips x (tokens {TOKENS_BYTES} B + poster {POSTER_BYTES} B) = "
          f"{payload} KiB of payload")  # fmt: skip
    header = ("where", "files", "disk KiB", "x payload", "write s", "fetch 5 ms")
    print(
        f"{header[0]:<22}{header[1]:>8}{header[2]:>10}{header[3]:>10}{header[4]:>9}{header[5]:>12}"
    )
    for name, row in results.items():
        ratio = "" if row["disk_kib"] is None else f"{row['disk_kib'] / payload:.2f}"
        disk = "" if row["disk_kib"] is None else str(row["disk_kib"])
        print(f"{name:<22}{row['files']:>8}{disk:>10}{ratio:>10}{row['write_s']:>9.1f}"
              f"{row['fetch5_p50_ms']:>12.3f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"clips": args.clips, "s3_clips": args.s3_clips,
                                         "results": results}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
