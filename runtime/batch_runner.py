"""Runs a batch plan on this machine's device: one loaded pipeline, one open bank, every video.

Resumable: an output that exists and decodes is skipped. A video is made in ``OUT/.partial``
and moved into place whole, so a crash or Ctrl-C loses at most the video in progress and never
leaves a partial file where an evaluator looks. Each video made (or failed) appends one line to
``OUT/batch.jsonl``: prompt, seed, every parameter, the memory clips used with their scores,
timings.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel
from tqdm import tqdm

from memory_bank.errors import BankError
from model.errors import InvalidClip, ModelError
from model.preprocess import probe_clip
from model.presets import get_preset
from model.sampling import Profile
from runtime.batch import PlannedVideo
from runtime.builders import load_pipeline_from, open_bank
from runtime.generation import GenerationRequest, MemoryOptions, resolve_generation, run_generation
from runtime.settings import Settings

RECORDS = "batch.jsonl"
PARTIAL = ".partial"


class BatchOptions(BaseModel):
    """The generation parameters every video of the batch shares (``None``: the preset's)."""

    retrieve: int = 0
    negative_prompt: str | None = None
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    profile: Profile | None = None


@dataclass
class BatchSummary:
    made: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.failures)


def is_done(path: Path) -> bool:
    """An output that exists and decodes (a truncated or empty file is made again)."""
    if not path.is_file():
        return False
    try:
        probe_clip(path)
    except InvalidClip:
        return False
    return True


def run_batch(
    settings: Settings,
    planned: list[PlannedVideo],
    out: Path,
    options: BatchOptions,
    *,
    progress: bool = True,
) -> BatchSummary:
    """Make every planned video not yet in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    partial = out / PARTIAL
    shutil.rmtree(partial, ignore_errors=True)  # what a killed run was making
    summary = BatchSummary()
    todo = []
    for video in planned:
        if is_done(out / video.output):
            summary.skipped += 1
        else:
            todo.append(video)
    if not todo:
        return summary
    preset = get_preset(settings.preset)
    bar = tqdm(total=len(planned), initial=summary.skipped, unit="video", disable=not progress)
    with contextlib.ExitStack() as resources:
        bank = resources.enter_context(open_bank(settings)) if options.retrieve else None
        pipe = load_pipeline_from(settings)
        pipe.set_progress_bar_config(disable=True)
        encoder_version = pipe.memory_encoder.fingerprint()
        partial.mkdir()
        resources.callback(shutil.rmtree, partial, True)
        with open(out / RECORDS, "a", encoding="utf-8") as records:
            for number, video in enumerate(todo):
                started = time.perf_counter()
                line: dict = {"output": video.output, "prompt": video.prompt.prompt,
                              "seed": video.seed, "sample": video.sample,
                              "category": video.prompt.category, **video.prompt.extra}  # fmt: skip
                try:
                    request = GenerationRequest(
                        prompt=video.prompt.prompt, seed=video.seed,
                        memory=MemoryOptions(k=options.retrieve),
                        **options.model_dump(exclude={"retrieve"}),
                    )  # fmt: skip
                    spec = resolve_generation(request, preset, bank)
                    made = run_generation(
                        pipe, preset, spec, partial / f"video-{number}.mp4",
                        bank=bank, encoder_version=encoder_version,
                    )  # fmt: skip
                    target = out / video.output
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(made.video, target)  # whole, or not there at all
                    line |= {
                        "status": "succeeded",
                        "params": spec.params.model_dump(mode="json"),
                        "memory": [used.model_dump(mode="json") for used in spec.memory],
                    }
                    summary.made += 1
                except (ModelError, BankError, ValueError) as error:
                    line |= {"status": "failed", "error": str(error)}
                    summary.failures.append((video.output, str(error)))
                line |= {
                    "seconds": round(time.perf_counter() - started, 3),
                    "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
                records.write(json.dumps(line) + "\n")
                records.flush()
                bar.update()
                bar.set_postfix(made=summary.made, skipped=summary.skipped, failed=summary.failed)
    bar.close()
    return summary
