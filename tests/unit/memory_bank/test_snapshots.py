"""Index snapshots: written in the background by one process per bank, never by a request, and
loaded by every other process (on any host) so that it starts from a snapshot plus the log tail
instead of rebuilding."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from memory_bank.bank import BankOptions, MemoryBank
from memory_bank.index import IndexConfig, VectorIndex
from memory_bank.storage import S3Storage
from memory_bank.synced_index import SyncedIndex
from tests.postgres import temporary_database
from tests.s3 import moto_server
from tests.unit.memory_bank.test_bank import _add

FAST = BankOptions(index=IndexConfig(exact_max=1000), save_index_every=2, snapshot_interval_s=0.05)


def wait_for(check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.02)
    raise AssertionError("timed out")


@pytest.fixture
def writes(monkeypatch) -> list[tuple[str, int, int]]:
    """Every snapshot stored: (thread name, id of the bank's store, log position)."""
    seen: list[tuple[str, int, int]] = []
    real = SyncedIndex.save_snapshot

    def recorded(self, data, applied):
        seen.append((threading.current_thread().name, id(self.store), applied))
        return real(self, data, applied)

    monkeypatch.setattr(SyncedIndex, "save_snapshot", recorded)
    return seen


def test_snapshots_are_written_in_the_background_not_by_requests(tmp_path, embedder, writes):
    with MemoryBank(tmp_path / "bank", embedder, FAST) as bank:
        wait_for(lambda: writes)  # an index built on open is saved at once
        for n in range(5):
            _add(bank, f"clip {n}")
            bank.search("clip", 3)  # requests apply changes...
        wait_for(lambda: any(applied >= 4 for _, _, applied in writes))  # every 2 changes
        threads = {name for name, _, _ in writes}
    assert threads <= {"ditmem-index-snapshots", "MainThread"}  # MainThread: the final close
    assert "ditmem-index-snapshots" in threads


def test_a_new_process_loads_the_snapshot_and_replays_the_tail(
    tmp_path, embedder, writes, monkeypatch
):
    root = tmp_path / "bank"
    with MemoryBank(root, embedder, FAST) as bank:
        for n in range(3):
            _add(bank, f"clip {n}")
    with MemoryBank(root, embedder, FAST) as writer:  # a change after the last snapshot
        monkeypatch.setattr(SyncedIndex, "save_snapshot", lambda *a: None)
        tail = _add(writer, "the tail clip").record
        writer._closing.set()
    monkeypatch.undo()

    def no_rebuild(self):
        raise AssertionError("a bank with a snapshot must not be rebuilt on open")

    monkeypatch.setattr(SyncedIndex, "build", no_rebuild)
    with MemoryBank(root, embedder, FAST) as reopened:
        assert reopened.index_size == 4
        assert reopened.search("the tail clip", 1)[0].clip_id == tail.clip_id


def test_one_writer_per_bank(tmp_path, embedder, writes):
    root = tmp_path / "bank"
    first = MemoryBank(root, embedder, FAST)
    second = MemoryBank(root, embedder, FAST)  # another process of the same host
    try:
        for n in range(6):
            _add(first if n % 2 else second, f"clip {n}")
            first.refresh()
            second.refresh()
            time.sleep(0.1)  # both writers' rounds come by: each would snapshot if it could
        wait_for(lambda: any(applied >= 6 for _, _, applied in writes))
        assert len(writes) >= 3 and len({store for _, store, _ in writes}) == 1, writes
    finally:
        first.close()
        second.close()


def test_searches_do_not_wait_for_a_slow_snapshot_copy(tmp_path, embedder, monkeypatch):
    copying = threading.Event()
    real = VectorIndex.to_bytes

    def slow_copy(self):
        copying.set()
        time.sleep(1.5)  # a copy of a very large index
        return real(self)

    with MemoryBank(tmp_path / "bank", embedder, FAST) as bank:
        _add(bank, "a red ball")
        time.sleep(0.3)
        monkeypatch.setattr(VectorIndex, "to_bytes", slow_copy)
        for n in range(3):
            _add(bank, f"clip {n}")
        assert copying.wait(10)
        started = time.perf_counter()
        hits = bank.search("a red ball", 1)
        assert time.perf_counter() - started < 0.5
        assert hits and hits[0].caption == "a red ball"


def test_a_host_with_an_empty_folder_starts_from_the_shared_snapshot(
    tmp_path: Path, embedder, monkeypatch
):
    """Two hosts, one PostgreSQL manifest and one bucket: the second starts from the first's
    snapshot plus the changes logged after it, without building its index."""
    with temporary_database() as url, moto_server() as (endpoint, bucket):
        files = S3Storage(bucket, "bank", endpoint_url=endpoint)
        with MemoryBank(tmp_path / "a", embedder, FAST, database_url=url, files=files) as a:
            for n in range(4):
                _add(a, f"clip {n}")
        assert any(key.endswith(".faiss") for key in files.keys("index/"))
        with MemoryBank(tmp_path / "a", embedder, FAST, database_url=url, files=files) as a:
            monkeypatch.setattr(SyncedIndex, "save_snapshot", lambda *args: None)
            late = _add(a, "a late clip").record
            a._closing.set()
        monkeypatch.undo()
        monkeypatch.setattr(SyncedIndex, "build", lambda self: pytest.fail("rebuilt"))
        with MemoryBank(tmp_path / "b", embedder, FAST, database_url=url, files=files) as b:
            assert b.index_size == 5
            assert b.search("a late clip", 1)[0].clip_id == late.clip_id
        assert not (tmp_path / "b" / "index" / "text.json").exists()  # nothing local needed
