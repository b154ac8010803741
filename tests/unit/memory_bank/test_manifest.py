"""The manifest on both databases: SQLite (the bank file) and PostgreSQL (the real local server),
its migrations, the in-place upgrade of a bank made before them, and the change log's order
under concurrent writers."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import torch
from safetensors.torch import save

from memory_bank.bank import MemoryBank
from memory_bank.errors import BankCorrupt, ClipNotFound, DuplicateClip
from memory_bank.store import ClipRow, ClipStore, NewClip
from model.tokens import ClipTokens
from tests.postgres import temporary_database, terminate_connections

DIM = 8


def new_clip(index: int, tags: tuple[str, ...] = ()) -> NewClip:
    vector = np.random.default_rng(index).standard_normal(DIM).astype(np.float32)
    return NewClip(
        caption=f"clip number {index}",
        source_name=f"clip-{index}.mp4",
        content_hash=hashlib.sha256(str(index).encode()).hexdigest(),
        duration_s=1.5,
        fps=8.0,
        num_frames=12,
        width=64,
        height=48,
        size_bytes=1000 + index,
        tags=tags,
        embedder="test-embedder",
        text_embedding=vector / np.linalg.norm(vector),
    )


def tokens(index: int) -> ClipTokens:
    generator = torch.Generator().manual_seed(index)
    return ClipTokens(
        torch.randn(1, 2, DIM, generator=generator),
        torch.randn(1, 2, DIM, generator=generator),
        torch.tensor([3, 1]),
    )


def add(store: ClipStore, index: int, tags: tuple[str, ...] = ()):
    return store.insert(
        new_clip(index, tags), tokens=tokens(index), encoder_version="v1",
        poster_jpeg=b"jpeg %d" % index, has_latent=True, source_ext=None,
    )  # fmt: skip


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request) -> Iterator[str | None]:
    if request.param == "sqlite":
        yield None
        return
    with temporary_database() as url:
        yield url


@pytest.fixture
def store(tmp_path: Path, database_url) -> Iterator[ClipStore]:
    opened = ClipStore(tmp_path / "bank", database_url)
    yield opened
    opened.close()


def test_records_tags_and_the_change_log(store: ClipStore):
    first = add(store, 1, ("red", "ball"))
    second = add(store, 2, ("blue",))
    assert store.get(first.clip_id).tags == ["ball", "red"]
    assert store.find_by_hash(second.content_hash) == second
    assert [r.clip_id for r in store.list(tag="red").items] == [first.clip_id]
    page = store.list(limit=1)
    assert [r.clip_id for r in page.items] == [second.clip_id] and store.count() == 2
    assert [r.clip_id for r in store.list(before=page.next_cursor).items] == [first.clip_id]
    assert store.get_many([second.clip_id, first.clip_id]) == [second, first]
    with pytest.raises(ClipNotFound, match="424242"):
        store.get_many([first.clip_id, 424242])

    ids, vectors = store.embeddings()
    assert ids.tolist() == [first.clip_id, second.clip_id]
    assert np.allclose(vectors[0], new_clip(1).text_embedding)

    cached = store.tokens_of([first.clip_id, second.clip_id, 999], "v1")
    assert set(cached) == {first.clip_id, second.clip_id}
    assert torch.allclose(cached[first.clip_id].high, tokens(1).high, atol=0.02)  # stored bf16
    assert torch.equal(cached[first.clip_id].counts, tokens(1).counts)
    assert store.tokens_of([first.clip_id], "v2") == {}
    assert store.poster_jpeg(second.clip_id) == b"jpeg 2"

    store.delete(first.clip_id)
    assert store.find_by_id(first.clip_id) is None
    assert store.tokens_of([first.clip_id], "v1") == {} and store.poster_jpeg(first.clip_id) is None
    assert store.count("red") == 0  # its tags went with it
    log = [(c.clip_id, c.op) for c in store.changes_since(0)]
    assert log == [(first.clip_id, "add"), (second.clip_id, "add"), (first.clip_id, "delete")]
    assert store.last_change() == store.changes_since(0)[-1].seq
    # Ids are never reused, so an index replaying the log never confuses two clips.
    assert add(store, 3).clip_id > second.clip_id


def test_the_same_content_twice_is_a_duplicate(store: ClipStore):
    add(store, 1)
    with pytest.raises(DuplicateClip):
        add(store, 1)
    assert store.count() == 1 and len(store.changes_since(0)) == 1


def row(index: int, tags: tuple[str, ...] = ()) -> ClipRow:
    return ClipRow(new_clip(index, tags), tokens(index), "v1", b"jpeg %d" % index, True, None)


def test_a_batch_of_clips_is_one_transaction_and_skips_what_is_stored(store: ClipStore):
    stored = add(store, 1)
    batch = [row(2, ("blue",)), row(1), row(3), row(2)]  # 1 is stored, 2 comes twice
    outcome = store.insert_many(batch)
    assert [created for _, created in outcome] == [True, False, True, False]
    assert outcome[1][0] == stored and outcome[3][0] == outcome[0][0]
    assert outcome[0][0].tags == ["blue"] and outcome[2][0].clip_id > outcome[0][0].clip_id
    assert store.count() == 3 and store.poster_jpeg(outcome[2][0].clip_id) == b"jpeg 3"
    assert set(store.tokens_of([outcome[0][0].clip_id], "v1")) == {outcome[0][0].clip_id}
    log = [(c.clip_id, c.op) for c in store.changes_since(0)]
    assert log == [(stored.clip_id, "add"), (outcome[0][0].clip_id, "add"),
                   (outcome[2][0].clip_id, "add")]  # fmt: skip
    assert store.insert_many([]) == [] and store.insert_many([row(3)])[0][1] is False


def test_a_batch_that_fails_stores_none_of_its_clips(store: ClipStore, monkeypatch):
    def refuse(*args, **kwargs):
        raise sa.exc.IntegrityError("INSERT", {}, Exception("constraint"))

    monkeypatch.setattr(ClipStore, "_insert_payloads", staticmethod(refuse))
    with pytest.raises(BankCorrupt, match="refused"):
        store.insert_many([row(1), row(2)])
    assert store.count() == 0 and store.changes_since(0) == []


def test_embedders_are_found_by_index_seeks_however_many_clips(store: ClipStore):
    import dataclasses

    rows = [row(n) for n in range(6)]
    for n, name in ((1, "b-model"), (2, "a-model"), (4, "b-model")):
        rows[n] = dataclasses.replace(
            rows[n], clip=dataclasses.replace(rows[n].clip, embedder=name)
        )
    store.insert_many(rows)
    assert store.embedders("text") == {"a-model", "b-model", "test-embedder"}
    assert store.embedders("visual") == set()


def test_stale_clips_and_encoder_versions(store: ClipStore):
    clip = add(store, 1)
    assert store.stale_clips("v1") == [] and store.stale_clips("v2") == [clip.clip_id]
    store.set_tokens(clip.clip_id, "v2", tokens(2))
    assert store.stale_clips("v2") == [] and store.get(clip.clip_id).encoder_version == "v2"
    # Both versions stay: workers still on the old encoder keep serving during a retoken.
    assert set(store.tokens_of([clip.clip_id], "v1")) == set(store.tokens_of([clip.clip_id], "v2"))
    with pytest.raises(ClipNotFound):
        store.set_tokens(424242, "v2", tokens(2))
    assert store.storage_of(clip.clip_id) == (clip.content_hash, True, None)


def test_concurrent_writers_never_hide_a_change_from_a_reader(tmp_path: Path, database_url):
    """A reader that follows the log by position sees every change exactly once, however the
    writers' transactions interleave (on PostgreSQL: sequence order is commit order)."""
    writers = [ClipStore(tmp_path / f"host-{n}", database_url) for n in range(3)]
    if database_url is None:  # SQLite: one bank file shared by the three handles
        writers = [ClipStore(tmp_path / "bank") for _ in range(3)]
    reader = writers[0]
    per_writer = 25
    seen: list[int] = []
    done = threading.Event()

    def follow() -> None:
        position = 0
        while True:
            finished = done.is_set()
            for change in reader.changes_since(position):
                seen.append(change.clip_id)
                position = change.seq
            if finished:
                return

    def write(n: int) -> None:
        for i in range(per_writer):
            add(writers[n], 1000 * (n + 1) + i)

    follower = threading.Thread(target=follow)
    follower.start()
    threads = [threading.Thread(target=write, args=(n,)) for n in range(len(writers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    follower.join()
    added = set(reader.embeddings()[0].tolist())
    assert len(added) == per_writer * len(writers)
    assert sorted(seen) == sorted(added), "the reader missed or repeated changes"
    for writer in writers:
        writer.close()


def test_a_terminated_connection_costs_a_reconnect_not_a_restart(tmp_path: Path):
    with temporary_database() as url:
        store = ClipStore(tmp_path / "bank", url)
        add(store, 1)
        assert terminate_connections(url) >= 1
        # Pooled connections are dead now; the next operations reconnect transparently.
        assert store.count() == 1
        add(store, 2)
        assert store.count() == 2
        store.close()


# -- upgrading a bank made before migrations ----------------------------------------------------

# The manifest exactly as the release before migrations created it (memory_bank/store.py then).
RELEASE_0_1_SCHEMA = """
CREATE TABLE clips (
    clip_id INTEGER PRIMARY KEY AUTOINCREMENT, caption TEXT NOT NULL, source_name TEXT NOT NULL,
    content_hash TEXT NOT NULL UNIQUE, duration_s REAL NOT NULL, fps REAL NOT NULL,
    num_frames INTEGER NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL, created_at TEXT NOT NULL, encoder_version TEXT,
    has_latent INTEGER NOT NULL DEFAULT 0, source_ext TEXT, embedder TEXT NOT NULL,
    text_embedding BLOB NOT NULL, visual_embedder TEXT, visual_embedding BLOB
);
CREATE TABLE clip_tags (
    clip_id INTEGER NOT NULL REFERENCES clips(clip_id) ON DELETE CASCADE, tag TEXT NOT NULL,
    PRIMARY KEY (clip_id, tag)
);
CREATE INDEX clip_tags_by_tag ON clip_tags(tag, clip_id);
CREATE TABLE changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, clip_id INTEGER NOT NULL,
    op TEXT NOT NULL CHECK (op IN ('add', 'delete'))
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta(key, value) VALUES ('schema_version', '1');
"""


def test_a_bank_of_the_previous_release_upgrades_in_place_with_nothing_lost(tmp_path: Path):
    root = tmp_path / "bank"
    root.mkdir()
    vector = np.arange(DIM, dtype=np.float32)
    with sqlite3.connect(root / "manifest.sqlite3") as old:
        old.executescript(RELEASE_0_1_SCHEMA)
        for clip_id in (1, 2, 5):  # a gap: clips 3 and 4 were deleted
            old.execute(
                "INSERT INTO clips VALUES (?, ?, ?, ?, 2.0, 8.0, 16, 64, 64, 999, "
                "'2026-11-01T10:00:00+00:00', 'v1', 1, NULL, 'minilm', ?, NULL, NULL)",
                (clip_id, f"old clip {clip_id}", f"{clip_id}.mp4", f"hash{clip_id}",
                 vector.tobytes()),
            )  # fmt: skip
            old.execute("INSERT INTO clip_tags VALUES (?, 'kept')", (clip_id,))
            old.execute("INSERT INTO changes (clip_id, op) VALUES (?, 'add')", (clip_id,))
    # ...and its token and poster files, where that release kept them.
    legacy_tokens = tokens(5)
    token_file = root / "tokens" / "v1" / "ha" / "hash5.safetensors"
    token_file.parent.mkdir(parents=True)
    token_file.write_bytes(save({"high": legacy_tokens.high[0], "low": legacy_tokens.low[0],
                                 "counts": legacy_tokens.counts}))  # fmt: skip
    poster_file = root / "posters" / "ha" / "hash2.jpg"
    poster_file.parent.mkdir(parents=True)
    poster_file.write_bytes(b"old poster")

    store = ClipStore(root)
    assert [r.clip_id for r in store.list().items] == [5, 2, 1]
    assert store.get(2).caption == "old clip 2" and store.get(2).tags == ["kept"]
    assert store.storage_of(5) == ("hash5", True, None)
    assert np.array_equal(store.embeddings()[1][0], vector)
    assert [c.clip_id for c in store.changes_since(0)] == [1, 2, 5]
    assert torch.equal(store.tokens_of([5], "v1")[5].high, legacy_tokens.high)
    assert store.poster_jpeg(2) == b"old poster"
    assert not (root / "tokens").exists() and not (root / "posters").exists()
    assert store.meta("schema_version") == "1"  # the old table and its rows stay as they were
    new = add(store, 7)
    assert new.clip_id == 6  # AUTOINCREMENT continues where the old bank stopped
    store.close()

    with sa.create_engine(f"sqlite:///{root / 'manifest.sqlite3'}").connect() as connection:
        version = connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
        indexes = {index["name"] for index in sa.inspect(connection).get_indexes("clips")}
    assert version == "0004"
    assert {"clips_by_embedder", "clips_by_encoder_version"} <= indexes
    ClipStore(root).close()  # opening again changes nothing


def test_two_hosts_share_one_postgresql_manifest(tmp_path: Path, embedder, tiny_pipe, clips):
    """Two banks with disjoint folders (two hosts) and one PostgreSQL manifest: what one host
    ingests or deletes, the other's search sees through the change log."""
    from memory_bank.ingest import ClipIngestor
    from model.presets import TINY
    from runtime.builders import open_bank
    from runtime.settings import Settings

    with temporary_database() as url:
        # Host B opens the bank as the service does, from DITMEM_* settings.
        host_b = open_bank(Settings(_env_file=None, bank_dir=tmp_path / "host-b", database_url=url))
        with MemoryBank(tmp_path / "host-a", embedder, database_url=url) as host_a, host_b:
            added = ClipIngestor(host_a, tiny_pipe, TINY).ingest(
                clips["red_right"], "a red square moving right", ["red"]
            )
            hits = host_b.search("a red square", 1)
            assert [h.clip_id for h in hits] == [added.record.clip_id]
            assert host_b.get(added.record.clip_id).tags == ["red"]
            host_b.delete(added.record.clip_id)
            assert host_a.search("a red square", 1) == []


def test_a_connection_dropped_in_the_middle_of_an_operation_is_retried(tmp_path: Path):
    """The server terminates our backend while a statement is on its way: the operation runs
    again on a new connection, and nothing is lost or applied twice."""
    with temporary_database() as url:
        store = ClipStore(tmp_path / "bank", url)
        add(store, 1)
        dropped = []

        @sa.event.listens_for(store._writer, "before_cursor_execute")
        def drop_once(connection, cursor, statement, *args) -> None:
            if not dropped and statement.lstrip().upper().startswith("INSERT INTO CLIPS"):
                dropped.append(terminate_connections(url))

        clip = add(store, 2)  # the first attempt's connection dies under it
        assert dropped and dropped[0] >= 1
        assert store.count() == 2 and store.get(clip.clip_id).caption == "clip number 2"
        assert [c.op for c in store.changes_since(0)] == ["add", "add"]
        store.close()


def test_opening_a_bank_survives_a_connection_dropped_during_its_migration():
    from memory_bank import manifest

    with temporary_database() as url:
        writer, _ = manifest.create_engines(manifest.database_url(Path("."), url))
        dropped = []

        @sa.event.listens_for(writer, "before_cursor_execute")
        def drop_once(connection, cursor, statement, *args) -> None:
            if not dropped and "pg_advisory_xact_lock" in statement:
                dropped.append(terminate_connections(url))

        manifest.upgrade(writer)  # the first attempt's connection dies under it
        assert dropped and dropped[0] >= 1
        with writer.connect() as connection:
            assert sa.inspect(connection).has_table("clip_tokens")
        writer.dispose()
