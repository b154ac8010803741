"""The output folder of a batch, the same whether the videos are made here or on a server.

Resumable: an output that exists and decodes is skipped. A video is written in ``OUT/.partial``
and moved into place whole, so a crash or Ctrl-C loses at most the videos in progress and never
leaves a partial file where an evaluator looks. Each video made (or failed) appends one line to
``OUT/batch.jsonl``: prompt, seed, every parameter, the memory clips used with their scores,
timings, and the job id when a server made it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from pydantic import BaseModel, ConfigDict
from tqdm import tqdm

from model.caching import CacheSpec
from model.errors import InvalidClip
from model.preprocess import probe_clip
from model.profiles import Profile
from runtime.batch import PlannedVideo

RECORDS = "batch.jsonl"
PARTIAL = ".partial"


class BatchOptions(BaseModel):
    """The generation parameters every video of the batch shares (``None``: the preset's)."""

    model_config = ConfigDict(extra="forbid")

    retrieve: int = 0
    negative_prompt: str | None = None
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    profile: Profile | None = None
    cache: CacheSpec | None = None

    def request_body(self, video: PlannedVideo) -> dict[str, Any]:
        """The ``POST /generate`` body (and ``GenerationRequest`` fields) of one video."""
        shared = self.model_dump(mode="json", exclude={"retrieve"}, exclude_none=True)
        return {"prompt": video.prompt.prompt, "seed": video.seed,
                "memory": {"k": self.retrieve}, **shared}  # fmt: skip


@dataclass
class BatchSummary:
    made: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0  # the whole run, loading the model (or reaching the service) included
    making_s: float = 0.0  # from the first video started to the last one placed

    @property
    def failed(self) -> int:
        return len(self.failures)


def progress_bar(total: int, skipped: int, enabled: bool) -> tqdm:
    return tqdm(total=total, initial=skipped, unit="video", disable=not enabled)


def show(bar: tqdm, summary: BatchSummary) -> None:
    """Done, skipped and failed beside the bar (it shows the rate and the time left)."""
    bar.set_postfix(made=summary.made, skipped=summary.skipped, failed=summary.failed)


def is_done(path: Path) -> bool:
    """An output that exists and decodes (a truncated or empty file is made again)."""
    if not path.is_file():
        return False
    try:
        probe_clip(path)
    except InvalidClip:
        return False
    return True


def describe(video: PlannedVideo) -> dict[str, Any]:
    """The fields of a video's record that the plan alone decides."""
    return {"output": video.output, "prompt": video.prompt.prompt, "seed": video.seed,
            "sample": video.sample, "category": video.prompt.category,
            **video.prompt.extra}  # fmt: skip


class BatchFolder:
    """``OUT``: what is done, where videos are made, where they go, and the record of each.

    Use as a context manager around the making: it clears what a killed run left in
    ``.partial`` on entry and removes the folder again on exit.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.partial = out / PARTIAL
        self._records: TextIO | None = None

    def pending(self, planned: list[PlannedVideo], summary: BatchSummary) -> list[PlannedVideo]:
        """The planned videos not made yet; the others count as skipped in ``summary``."""
        todo = []
        for video in planned:
            if is_done(self.out / video.output):
                summary.skipped += 1
            else:
                todo.append(video)
        return todo

    def __enter__(self) -> BatchFolder:
        self.out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.partial, ignore_errors=True)  # what a killed run was making
        self.partial.mkdir()
        self._records = open(self.out / RECORDS, "a", encoding="utf-8")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._records is not None:
            self._records.close()
            self._records = None
        shutil.rmtree(self.partial, ignore_errors=True)

    def scratch(self, number: int) -> Path:
        """Where video ``number`` of this run is written before it is placed."""
        return self.partial / f"video-{number}.mp4"

    def place(self, made: Path, video: PlannedVideo) -> Path:
        target = self.out / video.output
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(made, target)  # whole, or not there at all
        return target

    def record(self, line: dict[str, Any], started: float, now: float) -> None:
        assert self._records is not None, "record() outside the folder's context"
        line |= {
            "seconds": round(now - started, 3),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self._records.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._records.flush()
