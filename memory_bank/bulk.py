"""Bulk import from a folder of videos plus a CSV or JSONL of (video path, caption).

Public caption datasets (e.g. OpenVid: ``video,caption,...``) ship exactly this layout. The
import is resumable for free: files are content-addressed, so rows already in the bank are
recognised by their hash and skipped without decoding.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from memory_bank.errors import ClipRejected
from memory_bank.ingest import ClipIngestor, IngestItem, IngestResult

PATH_COLUMNS = ("video", "path", "file", "video_path", "filename")
CAPTION_COLUMNS = ("caption", "text", "prompt", "description")


@dataclass(frozen=True)
class CaptionRow:
    line: int  # 1-based line (CSV: data rows after the header count from 2)
    video: str
    caption: str
    tags: tuple[str, ...] = ()


@dataclass
class ImportSummary:
    imported: int = 0
    already_present: int = 0
    rejected: list[tuple[CaptionRow, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.imported + self.already_present + len(self.rejected)


def _pick(row: dict, names: tuple[str, ...], what: str, source: Path) -> str:
    for name in names:
        if name in row and row[name] is not None:
            return str(row[name])
    raise ValueError(f"{source.name}: no {what} column (expected one of {', '.join(names)})")


def read_caption_rows(captions: Path) -> Iterator[CaptionRow]:
    """Rows of a ``.csv`` (header row) or ``.jsonl`` captions file."""
    if captions.suffix.lower() in (".jsonl", ".ndjson"):
        with open(captions, encoding="utf-8") as handle:
            for number, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{captions.name} line {number}: not JSON ({error})") from None
                yield _row(row, number, captions)
        return
    with open(captions, encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.DictReader(handle), start=2):
            yield _row(row, number, captions)


def _row(row: dict, number: int, source: Path) -> CaptionRow:
    tags = row.get("tags") or ()
    if isinstance(tags, str):
        tags = tuple(t for t in tags.replace(";", ",").split(",") if t.strip())
    return CaptionRow(
        number,
        _pick(row, PATH_COLUMNS, "video path", source),
        _pick(row, CAPTION_COLUMNS, "caption", source),
        tuple(tags),
    )


def row_path(folder: Path, row: CaptionRow) -> Path:
    """Where a row's video is; a path that leaves ``folder`` is refused (:class:`ClipRejected`)."""
    path = (folder / row.video).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise ClipRejected(f"{row.video}: outside {folder}")
    return path


def import_folder(
    ingestor: ClipIngestor,
    folder: str | Path,
    captions: str | Path,
    *,
    extra_tags: tuple[str, ...] = (),
    batch_size: int = 16,
    progress: bool = True,
) -> ImportSummary:
    """Ingest every row of ``captions`` whose video lives under ``folder``, ``batch_size``
    clips per manifest transaction.

    A bad row (missing file, not a video, out of bounds) is recorded with its reason and the
    import goes on; nothing already stored is touched.
    """
    folder, captions = Path(folder), Path(captions)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    rows = list(read_caption_rows(captions))
    summary = ImportSummary()
    bar = tqdm(total=len(rows), desc="importing", unit="clip", disable=not progress)
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        outcomes: dict[int, IngestResult | ClipRejected] = {}
        items: dict[int, IngestItem] = {}
        for position, row in enumerate(batch):
            try:
                path = row_path(folder, row)
            except ClipRejected as error:
                outcomes[position] = error
            else:
                items[position] = IngestItem(path, row.caption, row.tags + extra_tags, row.video)
        ingested = ingestor.ingest_many(list(items.values()))
        outcomes.update(zip(items, ingested, strict=True))
        for position, row in enumerate(batch):  # in the file's order
            outcome = outcomes[position]
            if isinstance(outcome, ClipRejected):
                summary.rejected.append((row, str(outcome)))
            elif outcome.created:
                summary.imported += 1
            else:
                summary.already_present += 1
        bar.update(len(batch))
        bar.set_postfix(
            new=summary.imported, skipped=summary.already_present, bad=len(summary.rejected)
        )
    bar.close()
    return summary
