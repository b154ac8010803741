"""The memory bank end to end: real videos, real VAE + encoder (tiny), real embedder and FAISS."""

from __future__ import annotations

import io
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from memory_bank.bank import MemoryBank
from memory_bank.errors import BankCorrupt, ClipNotFound, ClipRejected
from memory_bank.ingest import ClipIngestor, IngestLimits
from model.preprocess import load_clip
from model.presets import TINY
from tests.media import moving_square, write_clip


def latent_file(bank: MemoryBank, content_hash: str) -> Path:
    return bank.root / bank.store.latent_key(content_hash)


def bank_files(bank: MemoryBank) -> list[Path]:
    return sorted(
        p for folder in ("tokens", "latents", "sources", "posters")
        for p in (bank.root / folder).rglob("*")
        if p.is_file()
    )  # fmt: skip


def test_ingest_stores_record_tokens_latent_and_index_entry(bank, ingestor, clips, tiny_pipe):
    result = ingestor.ingest(clips["red_right"], "a red square sliding right", ["demo", "red"])

    record = result.record
    assert result.created
    assert record.caption == "a red square sliding right"
    assert record.source_name == "red_right.mp4"
    assert record.tags == ["demo", "red"]
    assert (record.width, record.height, record.num_frames) == (48, 48, 12)
    assert record.duration_s == pytest.approx(1.5, abs=0.2)
    assert record.encoder_version == ingestor.encoder_version
    assert len(bank) == 1 and bank.index_size == 1

    # Cached tokens are what the encoder gives for the canonical clip (stored in bf16).
    video = load_clip(clips["red_right"], TINY.memory_frames, TINY.memory_height, TINY.memory_width)
    expected = tiny_pipe.resample_clips(video[None])
    cached = bank.clip_tokens([record.clip_id], ingestor.encoder_version)
    assert torch.equal(cached.counts, expected.counts)
    torch.testing.assert_close(cached.high, expected.high, atol=0.05, rtol=0.02)
    torch.testing.assert_close(cached.low, expected.low, atol=0.05, rtol=0.02)
    assert latent_file(bank, record.content_hash).is_file()  # keep_latents defaults on
    from PIL import Image

    with Image.open(io.BytesIO(bank.poster_jpeg(record.clip_id))) as poster:
        # A 48x48 clip is enlarged by a whole factor (2) so small clips stay visible.
        assert poster.format == "JPEG" and poster.size == (96, 96)


def test_search_ranks_by_caption_and_respects_exclusions_and_min_score(bank, ingestor, clips):
    red = ingestor.ingest(clips["red_right"], "a red ball rolling to the right").record
    cat = ingestor.ingest(clips["blue_left"], "a cat sleeping on a sofa").record

    hits = bank.search("red ball", k=2)
    assert [h.clip_id for h in hits] == [red.clip_id, cat.clip_id]
    assert hits[0].score > hits[1].score
    assert hits[0].caption == "a red ball rolling to the right"
    assert [h.clip_id for h in bank.search("red ball", k=2, exclude_ids=[red.clip_id])] == [
        cat.clip_id
    ]
    assert [h.clip_id for h in bank.search("red ball", k=2, min_score=hits[0].score - 1e-4)] == [
        red.clip_id
    ]
    assert bank.search("red ball", k=10)[-1].clip_id == cat.clip_id  # k beyond size: all there is
    with pytest.raises(ValueError):
        bank.search("   ")


def test_same_file_twice_returns_the_existing_id_and_stores_nothing_new(bank, ingestor, clips):
    first = ingestor.ingest(clips["red_right"], "a red square")
    files = bank_files(bank)
    second = ingestor.ingest(clips["red_right"], "another caption", ["x"])

    assert not second.created
    assert second.record.clip_id == first.record.clip_id
    assert second.record.caption == "a red square"
    assert len(bank) == 1 and bank.index_size == 1
    assert bank_files(bank) == files


def test_containers_other_than_mp4_are_ingested(bank, ingestor, clips):
    for name in ("green_right", "yellow_left"):
        assert ingestor.ingest(clips[name], f"a {name.replace('_', ' ')} square").created
    gif = write_clip(
        clips["red_right"].parent / "x.gif", moving_square("red"), codec="gif", pix_fmt="rgb8"
    )
    assert ingestor.ingest(gif, "an animated gif").created
    assert len(bank) == 3


def test_delete_removes_row_files_and_index_entry(bank, ingestor, clips):
    kept = ingestor.ingest(clips["blue_left"], "a blue square moving left").record
    gone = ingestor.ingest(clips["red_right"], "a red square moving right").record

    assert bank.delete(gone.clip_id).clip_id == gone.clip_id
    assert [h.clip_id for h in bank.search("a red square moving right", k=5)] == [kept.clip_id]
    assert bank.index_size == 1
    with pytest.raises(ClipNotFound):
        bank.get(gone.clip_id)
    with pytest.raises(ClipNotFound):
        bank.delete(gone.clip_id)
    assert all(gone.content_hash not in p.name for p in bank_files(bank))
    assert any(kept.content_hash in p.name for p in bank_files(bank))


def test_list_pages_newest_first_and_filters_by_tag(bank, ingestor, clips):
    ids = [
        ingestor.ingest(
            clips[name], f"clip {name}", ["left" if "left" in name else "right"]
        ).record.clip_id
        for name in ("red_right", "blue_left", "green_right")
    ]
    page = bank.list(limit=2)
    assert [r.clip_id for r in page.items] == ids[::-1][:2] and page.next_cursor == ids[1]
    last = bank.list(before=page.next_cursor, limit=2)
    assert [r.clip_id for r in last.items] == [ids[0]] and last.next_cursor is None
    assert bank.count() == bank.index_size == 3
    right = bank.list(tag="right", limit=1)
    assert [r.clip_id for r in right.items] == [ids[2]] and right.next_cursor == ids[2]
    assert [r.clip_id for r in bank.list(tag="right", before=ids[2]).items] == [ids[0]]
    assert [r.clip_id for r in bank.iter_clips("right", page_size=1)] == [ids[2], ids[0]]
    assert bank.count("right") == 2 and bank.count("none") == 0
    assert bank.list(tag="none").items == []


def test_rebuild_equals_incremental(bank, ingestor, clips):
    for name in clips:
        ingestor.ingest(clips[name], f"a {name.replace('_', ' ')} square")
    bank.delete(bank.search("green", k=1)[0].clip_id)
    queries = ["red", "blue square going left", "yellow", "square moving right"]
    incremental = [[(h.clip_id, round(h.score, 5)) for h in bank.search(q, k=3)] for q in queries]

    assert bank.rebuild_index() == 3
    rebuilt = [[(h.clip_id, round(h.score, 5)) for h in bank.search(q, k=3)] for q in queries]
    assert rebuilt == incremental


def test_reopened_bank_and_a_second_handle_see_every_change(
    tmp_path, embedder, bank_options, tiny_pipe, clips
):
    root = tmp_path / "bank"
    writer = MemoryBank(root, embedder, bank_options)
    reader = MemoryBank(root, embedder, bank_options)  # as the API process would hold it
    ingest = ClipIngestor(writer, tiny_pipe, TINY)
    first = ingest.ingest(clips["red_right"], "a red square").record
    assert [h.clip_id for h in reader.search("red square", k=1)] == [first.clip_id]

    second = ingest.ingest(clips["blue_left"], "a blue square").record
    writer.delete(first.clip_id)
    assert [h.clip_id for h in reader.search("red square", k=5)] == [second.clip_id]
    writer.close()
    reader.close()

    reopened = MemoryBank(root, embedder, bank_options)
    assert reopened.index_size == 1
    assert [h.clip_id for h in reopened.search("square", k=5)] == [second.clip_id]
    reopened.close()


def test_a_lost_index_file_is_rebuilt_from_the_manifest(
    tmp_path, embedder, bank_options, tiny_pipe, clips
):
    root = tmp_path / "bank"
    with MemoryBank(root, embedder, bank_options) as bank:
        ClipIngestor(bank, tiny_pipe, TINY).ingest(clips["red_right"], "a red square")
        bank.save_index()
    for saved in (root / "index").glob("*.faiss"):
        saved.write_bytes(b"garbage")
    with MemoryBank(root, embedder, bank_options) as bank:
        assert bank.index_size == 1
        assert bank.search("red", k=1)[0].caption == "a red square"


@pytest.mark.parametrize(
    ("make", "limits", "message"),
    [
        (lambda d: d / "missing.mp4", IngestLimits(), "file not found"),
        (lambda d: _text(d / "notes.mp4"), IngestLimits(), "notes.mp4"),
        (lambda d: _corrupt(d / "broken.mp4"), IngestLimits(), "broken.mp4"),
        (lambda d: _clip(d / "ok.mp4"), IngestLimits(max_bytes=100), "limit is"),
        (lambda d: _clip(d / "ok.mp4"), IngestLimits(max_duration_s=0.5), "lasts"),
        (lambda d: _clip(d / "ok.mp4"), IngestLimits(max_width=32), "48x48"),
    ],
    ids=["missing", "text", "corrupt", "too-big", "too-long", "too-wide"],
)
def test_bad_uploads_are_rejected_and_leave_the_bank_unchanged(
    bank, tiny_pipe, clips, tmp_path, make, limits, message
):
    kept = ClipIngestor(bank, tiny_pipe, TINY).ingest(clips["red_right"], "a red square").record
    before = (len(bank), bank_files(bank), bank.store.last_change())

    with pytest.raises(ClipRejected, match=message):
        ClipIngestor(bank, tiny_pipe, TINY, limits).ingest(make(tmp_path), "a caption")

    assert (len(bank), bank_files(bank), bank.store.last_change()) == before
    assert bank.get(kept.clip_id) == kept


@pytest.mark.parametrize(
    ("caption", "tags"),
    [("  ", []), ("x" * 2001, []), ("ok", ["t"] * 0 + [f"t{i}" for i in range(40)])],
)
def test_bad_captions_and_tags_are_rejected(bank, ingestor, clips, caption, tags):
    with pytest.raises(ClipRejected):
        ingestor.ingest(clips["red_right"], caption, tags)
    assert len(bank) == 0


def test_tokens_of_another_encoder_version_are_reported(bank, ingestor, clips):
    record = ingestor.ingest(clips["red_right"], "a red square").record
    with pytest.raises(BankCorrupt, match="no tokens for encoder"):
        bank.clip_tokens([record.clip_id], "0000000000000000")
    with pytest.raises(ClipNotFound):
        bank.clip_tokens([record.clip_id + 100], ingestor.encoder_version)


def test_a_bank_embedded_with_another_model_is_refused(
    tmp_path, embedder, bank_options, tiny_pipe, clips
):
    root = tmp_path / "bank"
    with MemoryBank(root, embedder, bank_options) as bank:
        ClipIngestor(bank, tiny_pipe, TINY).ingest(clips["red_right"], "a red square")

    class OtherEmbedder:
        name, dim = "other-model", embedder.dim

        def embed(self, texts):
            return embedder.embed(texts)

    with pytest.raises(BankCorrupt, match="other-model"):
        MemoryBank(root, OtherEmbedder(), bank_options)


def test_searches_run_while_clips_are_ingested_and_deleted(bank, ingestor, clips, tmp_path):
    base = ingestor.ingest(clips["red_right"], "a red square").record
    errors: list[BaseException] = []
    stop = threading.Event()
    searched = 0

    def search_loop() -> None:
        nonlocal searched
        while not stop.is_set():
            try:
                hits = bank.search("a square", k=5)
                assert base.clip_id in {h.clip_id for h in hits}
                searched += 1
            except BaseException as error:  # noqa: BLE001 - surfaced below
                errors.append(error)
                return

    readers = [threading.Thread(target=search_loop) for _ in range(3)]
    for reader in readers:
        reader.start()
    try:
        for index in range(4):
            frames = moving_square("green", 1 if index % 2 else -1, num_frames=8 + index)
            path = write_clip(tmp_path / f"extra{index}.mp4", frames)
            record = ingestor.ingest(path, f"a green square number {index}").record
            if index % 2:
                bank.delete(record.clip_id)
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert not errors, errors[0]
    assert searched > 0
    assert len(bank) == 3 and bank.index_size == 3


def _text(path: Path) -> Path:
    path.write_text("this is not a video")
    return path


def _corrupt(path: Path) -> Path:
    data = bytearray(write_clip(path.with_name("good.mp4"), moving_square()).read_bytes())
    data[len(data) // 3 :] = (
        np.random.default_rng(0)
        .integers(0, 256, len(data) - len(data) // 3, dtype=np.uint8)
        .tobytes()
    )
    path.write_bytes(bytes(data[: len(data) // 2]))
    return path


def _clip(path: Path) -> Path:
    return write_clip(path, moving_square("blue"))


def test_garbage_collection_only_removes_unreferenced_files(bank, ingestor, clips):
    kept = ingestor.ingest(clips["red_right"], "a red square").record
    orphan = latent_file(bank, "f" * 64)
    orphan.parent.mkdir(parents=True)
    shutil.copyfile(bank_files(bank)[0], orphan)

    assert bank.store.collect_garbage() == 0  # young files may belong to a live ingest
    assert bank.store.collect_garbage(min_age_s=-1) == 1
    assert not orphan.exists()
    assert bank.clip_tokens([kept.clip_id], ingestor.encoder_version).num_clips == 1


def test_a_new_encoder_gets_its_tokens_recomputed_from_kept_latents(bank, ingestor, clips):
    from memory_bank.bank import BankOptions
    from model.pipeline import MemoryWanPipeline
    from model.tiny import build_tiny_components

    record = ingestor.ingest(clips["red_right"], "a red square").record
    new_pipe = MemoryWanPipeline(**build_tiny_components(seed=7))  # different encoder weights
    retrained = ClipIngestor(bank, new_pipe, TINY)
    assert retrained.encoder_version != ingestor.encoder_version
    with pytest.raises(BankCorrupt):
        bank.clip_tokens([record.clip_id], retrained.encoder_version)

    outcome = retrained.refresh_tokens()

    assert outcome.updated == [record.clip_id] and not outcome.unrecoverable
    assert bank.get(record.clip_id).encoder_version == retrained.encoder_version
    latent = bank.store.read_latent(record.content_hash).unsqueeze(0)
    expected = new_pipe.memory_encoder.resample(latent)
    cached = bank.clip_tokens([record.clip_id], retrained.encoder_version)
    torch.testing.assert_close(cached.high, expected.high, atol=0.05, rtol=0.02)
    assert retrained.refresh_tokens().updated == []  # nothing stale any more
    assert BankOptions().keep_latents


def test_clips_without_latent_or_source_are_reported_unrecoverable(
    tmp_path, embedder, tiny_pipe, clips
):
    from memory_bank.bank import BankOptions
    from model.pipeline import MemoryWanPipeline
    from model.tiny import build_tiny_components

    with MemoryBank(tmp_path / "lean", embedder, BankOptions(keep_latents=False)) as lean:
        record = ClipIngestor(lean, tiny_pipe, TINY).ingest(clips["red_right"], "red").record
        assert not latent_file(lean, record.content_hash).exists()
        outcome = ClipIngestor(
            lean, MemoryWanPipeline(**build_tiny_components(seed=7)), TINY
        ).refresh_tokens()
        assert outcome.unrecoverable == [record.clip_id] and outcome.updated == []

    with MemoryBank(
        tmp_path / "sources", embedder, BankOptions(keep_latents=False, keep_sources=True)
    ) as kept:
        record = ClipIngestor(kept, tiny_pipe, TINY).ingest(clips["red_right"], "red").record
        outcome = ClipIngestor(
            kept, MemoryWanPipeline(**build_tiny_components(seed=7)), TINY
        ).refresh_tokens()
        assert outcome.updated == [record.clip_id]


# -- the bank's own write and read API, without ingest ---------------------------------------------


def _new_clip(bank: MemoryBank, caption: str):
    import hashlib

    from memory_bank.bank import NewClip

    return NewClip(
        caption=caption, source_name=f"{caption}.mp4",
        content_hash=hashlib.sha256(caption.encode()).hexdigest(),
        duration_s=1.0, fps=8.0, num_frames=8, width=16, height=16, size_bytes=123, tags=("t",),
        embedder=bank.embedder.name, text_embedding=bank.embedder.embed([caption])[0],
    )  # fmt: skip


def _tokens(seed: int):
    from model.tokens import ClipTokens

    generator = torch.Generator().manual_seed(seed)
    return ClipTokens(
        torch.randn(1, 3, 8, generator=generator),
        torch.randn(1, 3, 8, generator=generator),
        torch.tensor([2, 1, 1]),
    )


def _add(bank: MemoryBank, caption: str, *, latent=True, source: Path | None = None):
    return bank.add_clip(
        _new_clip(bank, caption),
        tokens=_tokens(0),
        encoder_version="v1",
        poster_jpeg=b"\xff\xd8 not really a jpeg",
        latent=torch.full((4, 2, 3, 3), float(len(caption))) if latent else None,
        source=source,
    )


def test_add_clip_writes_every_file_before_the_row(tmp_path, embedder, bank_options, monkeypatch):
    options = bank_options.model_copy(update={"keep_sources": True})
    source = tmp_path / "upload.MP4"
    source.write_bytes(b"the uploaded bytes")
    with MemoryBank(tmp_path / "bank", embedder, options) as bank:
        files_at_insert: list[Path] = []
        insert = bank.store.insert_many

        def checked_insert(*args, **kwargs):
            files_at_insert.extend(bank_files(bank))
            assert len(bank) == 0
            return insert(*args, **kwargs)

        monkeypatch.setattr(bank.store, "insert_many", checked_insert)
        added = _add(bank, "a red square", source=source)

        assert added.created and len(bank) == 1 and bank.index_size == 1
        assert files_at_insert == bank_files(bank)
        # Latent and source are files; tokens and poster go with the row itself.
        assert {p.parts[len(bank.root.parts)] for p in files_at_insert} == {"latents", "sources"}
        assert bank.poster_jpeg(added.record.clip_id).startswith(b"\xff\xd8")
        assert bank.search("red square", k=1)[0].clip_id == added.record.clip_id
        with bank.clip_source(added.record.clip_id) as kept_source:
            assert kept_source.read_bytes() == b"the uploaded bytes"
            assert kept_source.suffix == ".mp4"
        assert torch.equal(bank.clip_latent(added.record.clip_id), torch.full((4, 2, 3, 3), 12.0))
        cached = bank.clip_tokens([added.record.clip_id], "v1")
        torch.testing.assert_close(cached.high, _tokens(0).high, atol=0.05, rtol=0.02)


def test_add_clip_of_a_hash_already_stored_returns_that_clip(bank):
    first = _add(bank, "a red square")
    again = bank.add_clip(  # as when another process won the race past ingest's hash check
        _new_clip(bank, "a red square"), tokens=_tokens(1), encoder_version="v1",
        poster_jpeg=b"\xff\xd8 other",
    )  # fmt: skip
    assert not again.created and again.record == first.record
    assert len(bank) == 1 and bank.index_size == 1


def test_add_clip_passes_on_a_failed_insert_that_is_no_duplicate(bank, monkeypatch):
    def broken_insert(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bank.store, "insert_many", broken_insert)
    with pytest.raises(OSError, match="disk full"):
        _add(bank, "a red square")
    assert len(bank) == 0 and bank.index_size == 0


def test_what_the_bank_does_not_keep_reads_as_none(tmp_path, embedder, bank_options):
    source = tmp_path / "upload.mp4"
    source.write_bytes(b"bytes")
    lean_options = bank_options.model_copy(update={"keep_latents": False})
    with MemoryBank(tmp_path / "lean", embedder, lean_options) as lean:
        clip_id = _add(lean, "a red square", source=source).record.clip_id
        assert lean.clip_latent(clip_id) is None  # offered, but the bank keeps no latents
        assert lean.clip_source(clip_id) is None  # keep_sources is off by default
        assert not any(p.parts[len(lean.root.parts)] in ("latents", "sources")
                       for p in bank_files(lean))  # fmt: skip
        with pytest.raises(ClipNotFound):
            lean.clip_latent(clip_id + 1)
        with pytest.raises(ClipNotFound):
            lean.clip_source(clip_id + 1)


def test_a_missing_latent_file_is_reported_as_corruption(bank):
    record = _add(bank, "a red square").record
    latent_file(bank, record.content_hash).unlink()
    with pytest.raises(BankCorrupt, match="latent"):
        bank.clip_latent(record.clip_id)


def test_latent_batches_cover_clips_with_a_latent_in_id_order(bank):
    ids = [_add(bank, caption).record.clip_id for caption in ("one", "three", "five")]
    _add(bank, "no latent here", latent=False)

    batches = list(bank.latent_batches(2))

    assert [tuple(b.shape) for b in batches] == [(2, 4, 2, 3, 3), (1, 4, 2, 3, 3)]
    assert [float(latent[0, 0, 0, 0]) for b in batches for latent in b] == [3.0, 5.0, 4.0]
    assert bank.caption_embeddings()[0].tolist() == [*ids, ids[-1] + 1]
    with pytest.raises(ValueError):
        next(bank.latent_batches(0))


def test_replace_tokens_makes_a_stale_clip_current(bank):
    record = _add(bank, "a red square").record
    assert bank.stale_clips("v1") == [] and bank.stale_clips("v2") == [record.clip_id]

    bank.replace_tokens(record.clip_id, "v2", _tokens(5))

    assert bank.get(record.clip_id).encoder_version == "v2"
    assert bank.stale_clips("v2") == []
    cached = bank.clip_tokens([record.clip_id], "v2")
    torch.testing.assert_close(cached.low, _tokens(5).low, atol=0.05, rtol=0.02)
    assert bank.find_by_hash(record.content_hash) == bank.get(record.clip_id)
    assert bank.find_by_hash("0" * 64) is None


def test_a_repeated_prompt_is_embedded_once(tmp_path, embedder, monkeypatch):
    calls: list[list[str]] = []
    with MemoryBank(tmp_path / "bank", embedder) as bank:
        _add(bank, "a red ball")
        real = bank.embedder.embed
        monkeypatch.setattr(
            bank.embedder, "embed", lambda texts: calls.append(texts) or real(texts)
        )
        first = bank.search("a red ball falling", 1)
        again = bank.search("a red ball falling", 1)
        bank.search("a blue ball", 1)
    assert first == again
    assert calls == [["a red ball falling"], ["a blue ball"]]
