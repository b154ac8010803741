"""Runs a batch plan on this machine's device: one loaded pipeline, one open bank, every video.

``runtime.batch_remote`` runs the same plan on a ditmem service instead; both keep the output
folder the same way (``runtime.batch_outputs``).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from memory_bank.errors import BankError
from model.errors import ModelError
from model.presets import get_preset
from runtime.batch import PlannedVideo
from runtime.batch_outputs import (
    BatchFolder,
    BatchOptions,
    BatchSummary,
    describe,
    progress_bar,
    show,
)
from runtime.builders import load_pipeline_from, open_bank
from runtime.generation import GenerationRequest, resolve_generation, run_generation
from runtime.settings import Settings


def run_batch(
    settings: Settings,
    planned: list[PlannedVideo],
    out: Path,
    options: BatchOptions,
    *,
    progress: bool = True,
) -> BatchSummary:
    """Make every planned video not yet in ``out``, one after the other on this device."""
    began = time.perf_counter()
    summary = BatchSummary()
    folder = BatchFolder(out)
    todo = folder.pending(planned, summary)
    if not todo:
        return summary
    preset = get_preset(settings.preset)
    bar = progress_bar(len(planned), summary.skipped, progress)
    with contextlib.ExitStack() as resources:
        bank = resources.enter_context(open_bank(settings)) if options.retrieve else None
        pipe = load_pipeline_from(settings)
        pipe.set_progress_bar_config(disable=True)
        encoder_version = pipe.memory_encoder.fingerprint()
        resources.enter_context(folder)
        first_started = time.perf_counter()
        for number, video in enumerate(todo):
            started = time.perf_counter()
            line = describe(video)
            try:
                request = GenerationRequest.model_validate(options.request_body(video))
                spec = resolve_generation(request, preset, bank)
                made = run_generation(
                    pipe, preset, spec, folder.scratch(number),
                    bank=bank, encoder_version=encoder_version,
                )  # fmt: skip
                folder.place(made.video, video)
                line |= {
                    "status": "succeeded",
                    "preset": preset.name,
                    "params": spec.params.model_dump(mode="json"),
                    "memory": [used.model_dump(mode="json") for used in spec.memory],
                }
                summary.made += 1
            except (ModelError, BankError, ValueError) as error:
                line |= {"status": "failed", "error": str(error)}
                summary.failures.append((video.output, str(error)))
            folder.record(line, started, time.perf_counter())
            bar.update()
            show(bar, summary)
        summary.making_s = time.perf_counter() - first_started
    bar.close()
    summary.seconds = time.perf_counter() - began
    return summary
