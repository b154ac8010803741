"""Bulk import from a folder and a captions file: progress, resume, rejected rows."""

from __future__ import annotations

import json
import shutil

import pytest

from memory_bank.bulk import import_folder, read_caption_rows
from tests.media import moving_square, write_clip


@pytest.fixture
def dataset(tmp_path, clips):
    folder = tmp_path / "videos"
    (folder / "sub").mkdir(parents=True)
    shutil.copyfile(clips["red_right"], folder / "a.mp4")
    shutil.copyfile(clips["blue_left"], folder / "sub" / "b.mp4")
    write_clip(folder / "c.mkv", moving_square("green", 1, num_frames=10))
    (folder / "bad.mp4").write_text("not a video")
    return folder


def test_csv_import_reports_rejections_and_resumes(bank, ingestor, dataset, tmp_path):
    captions = tmp_path / "captions.csv"
    captions.write_text(
        "video,caption,tags\n"
        "a.mp4,a red square sliding right,red\n"
        "sub/b.mp4,a blue square sliding left,\n"
        "bad.mp4,broken file,\n"
        "missing.mp4,no such file,\n"
        "../escape.mp4,outside the folder,\n"
    )
    summary = import_folder(ingestor, dataset, captions, extra_tags=("openvid",), progress=False)

    assert (summary.imported, summary.already_present) == (2, 0)
    assert [(row.line, row.video) for row, _ in summary.rejected] == [
        (4, "bad.mp4"), (5, "missing.mp4"), (6, "../escape.mp4"),
    ]  # fmt: skip
    assert "outside" in summary.rejected[2][1]
    assert len(bank) == 2
    record = bank.search("red square", k=1)[0]
    assert bank.get(record.clip_id).tags == ["openvid", "red"]
    assert bank.get(record.clip_id).source_name == "a.mp4"

    # Interrupted or not, running it again adds only what is new.
    with open(captions, "a") as handle:
        handle.write("c.mkv,a green square,\n")
    again = import_folder(ingestor, dataset, captions, progress=False)
    assert (again.imported, again.already_present, len(again.rejected)) == (1, 2, 3)
    assert len(bank) == 3


def test_jsonl_import(bank, ingestor, dataset, tmp_path):
    captions = tmp_path / "captions.jsonl"
    rows = [{"path": "a.mp4", "text": "red"}, {"path": "sub/b.mp4", "text": "blue"}]
    captions.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    summary = import_folder(ingestor, dataset, captions, progress=False)
    assert summary.imported == 2 and not summary.rejected


def test_captions_file_without_the_needed_columns_is_an_error(tmp_path):
    captions = tmp_path / "captions.csv"
    captions.write_text("name,description\nx.mp4,hello\n")
    with pytest.raises(ValueError, match="video path column"):
        list(read_caption_rows(captions))
    broken = tmp_path / "captions.jsonl"
    broken.write_text('{"video": "a.mp4", "caption": "x"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2"):
        list(read_caption_rows(broken))


def test_a_batch_keeps_its_good_clips_when_one_is_refused(bank, ingestor, dataset, monkeypatch):
    from memory_bank.errors import ClipRejected
    from memory_bank.ingest import IngestItem

    transactions = []
    insert_many = bank.store.insert_many
    monkeypatch.setattr(
        bank.store, "insert_many", lambda rows: transactions.append(len(rows)) or insert_many(rows)
    )
    outcomes = ingestor.ingest_many([
        IngestItem(dataset / "a.mp4", "a red square", ("red",)),
        IngestItem(dataset / "bad.mp4", "broken"),
        IngestItem(dataset / "sub" / "b.mp4", "a blue square", (), "b-upload.mp4"),
        IngestItem(dataset / "a.mp4", "the red one again"),
    ])  # fmt: skip
    assert transactions == [3]  # the three decodable files, in one manifest transaction
    red, bad, blue, again = outcomes
    assert isinstance(bad, ClipRejected) and "bad.mp4" in str(bad)
    assert red.created and blue.created and not again.created
    assert again.record == red.record and blue.record.source_name == "b-upload.mp4"
    assert bank.search("a blue square", k=1)[0].clip_id == blue.record.clip_id
