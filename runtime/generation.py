"""One generation from request to mp4, the same for ``ditmem generate`` and every worker.

:func:`resolve_generation` turns a request into a :class:`GenerateSpec` once, where it is
accepted (the API route or the CLI): parameters checked against the preset, the seed drawn, the
memory clips chosen (pinned ids looked up, or the prompt searched in the bank).
:func:`run_generation` then makes exactly that video: memory tokens from the bank, the
pipeline, the mp4 and the JSON record beside it, each written atomically.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from memory_bank.bank import MemoryBank
from model.atomic import atomic_write_text
from model.caching import CacheSpec
from model.generation import (
    MAX_PROMPT_CHARS,
    MAX_SEED,
    GenerationParams,
    clip_tokens_from_files,
    generate,
)
from model.pipeline import CancelCheck, LatentsCallback, MemoryWanPipeline, ProgressCallback
from model.presets import Preset
from model.profiles import Profile
from model.tokens import ClipTokens
from model.video_io import write_video
from runtime.jobs import GenerateSpec, MemoryClipUsed
from runtime.metrics import MetricsSink

DEFAULT_MEMORY_CLIPS = 5
MAX_MEMORY_CLIPS = 16


class MemoryOptions(BaseModel):
    """Which reference clips steer the generation."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(
        DEFAULT_MEMORY_CLIPS, ge=0, le=MAX_MEMORY_CLIPS, description="clips to retrieve; 0: none"
    )
    clip_ids: list[int] | None = Field(
        None, max_length=MAX_MEMORY_CLIPS, description="use these clips instead of retrieving"
    )
    min_score: float | None = Field(None, ge=-1, le=1, description="drop weaker matches")


class GenerationRequest(BaseModel):
    """One video to generate. Unset fields take the preset's defaults; bounds are the preset's."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    num_frames: int | None = Field(None, ge=1, le=1024)
    width: int | None = Field(None, ge=16, le=4096)
    height: int | None = Field(None, ge=16, le=4096)
    steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0, le=100)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    memory_guidance: bool | None = Field(
        None,
        description="memory in the conditional branch of classifier-free guidance only, so "
        "guidance_scale amplifies it (default: the preset's)",
    )
    profile: Profile | None = Field(
        None,
        description="sampling profile: 'default' (the preset's scheduler) or 'reference' (the "
        "DiT-Mem reference implementation's sampler, noise and defaults; default: the preset's)",
    )
    memory: MemoryOptions = Field(default_factory=MemoryOptions)
    cache: CacheSpec | None = Field(
        None,
        description="a step cache: {kind: none | first-block | mag | taylorseer, threshold "
        "(first-block, mag; 0 never skips) or interval (taylorseer; 1 never skips)}: skips "
        "transformer work on steps that change little; not with the reference profile",
    )
    preview_every: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="a live preview image every N denoising steps (its URL in the event "
        "stream); off by default",
    )


def select_memory(
    bank: MemoryBank | None,
    prompt: str,
    options: MemoryOptions,
    metrics: MetricsSink | None = None,
) -> tuple[MemoryClipUsed, ...]:
    """The clips a generation uses: the pinned ones (must exist) or the prompt's best matches."""
    if not options.clip_ids and options.k == 0:
        return ()
    if bank is None:
        raise ValueError("memory clips come from a memory bank, and none is open")
    if options.clip_ids:
        records = bank.get_many(list(options.clip_ids))
        return tuple(MemoryClipUsed(clip_id=r.clip_id, caption=r.caption) for r in records)
    started = time.perf_counter()
    hits = bank.search(prompt, options.k, min_score=options.min_score)
    if metrics is not None:
        metrics.observe("retrieval_seconds", time.perf_counter() - started)
    return tuple(MemoryClipUsed(clip_id=h.clip_id, score=h.score, caption=h.caption) for h in hits)


def resolve_generation(
    request: GenerationRequest,
    preset: Preset,
    bank: MemoryBank | None,
    metrics: MetricsSink | None = None,
) -> GenerateSpec:
    """Validate ``request`` against ``preset`` and choose its memory: the job to run.

    Raises:
        InvalidRequest: a parameter is outside the preset's bounds.
        ClipNotFound: a pinned clip does not exist.
    """
    # The fields as they are (a shallow read): the cache stays a CacheSpec, not a dict.
    fields = {k: v for k, v in request if k not in {"prompt", "memory", "preview_every"}}
    params = GenerationParams.resolve(preset, request.prompt, **fields)
    memory = select_memory(bank, params.prompt, request.memory, metrics)
    return GenerateSpec(params=params, memory=memory, preview_every=request.preview_every)


class GenerationRecord(BaseModel):
    """The JSON written beside each video: enough to reproduce it."""

    job_id: str | None = None
    preset: str
    params: GenerationParams
    memory: tuple[MemoryClipUsed, ...]
    memory_files: tuple[str, ...] = ()
    num_memory_clips: int
    encoder_version: str
    timings_s: dict[str, float]


@dataclass(frozen=True)
class GenerationOutput:
    video: Path
    record_path: Path
    record: GenerationRecord


def run_generation(
    pipe: MemoryWanPipeline,
    preset: Preset,
    spec: GenerateSpec,
    out: Path,
    *,
    bank: MemoryBank | None = None,
    memory_files: Sequence[Path] = (),
    encoder_version: str | None = None,
    job_id: str | None = None,
    on_progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    on_latents: LatentsCallback | None = None,
) -> GenerationOutput:
    """Make ``spec``'s video at ``out`` (mp4) with its record at ``out`` + ``.json``.

    Args:
        bank: Where ``spec.memory``'s cached tokens are read (needed when it names clips).
        memory_files: Reference clips outside the bank (the CLI's ``--memory``), encoded here.
        encoder_version: Fingerprint of ``pipe``'s encoder, if the caller already has it.
    """
    version = encoder_version or pipe.memory_encoder.fingerprint()
    groups: list[ClipTokens] = []
    if memory_files:
        groups.append(clip_tokens_from_files(pipe, preset, memory_files))
    if spec.memory:
        if bank is None:
            raise ValueError("this generation uses memory bank clips, and no bank is open")
        groups.append(bank.clip_tokens([used.clip_id for used in spec.memory], version))
    tokens = ClipTokens.stack(groups) if groups else None

    result = generate(
        pipe, preset, spec.params, tokens, on_progress=on_progress, should_cancel=should_cancel,
        on_latents=on_latents, latents_every=spec.preview_every or 0,
    )  # fmt: skip
    video = write_video(result.frames, out, fps=preset.fps, scale=preset.display_scale)
    record = GenerationRecord(
        job_id=job_id,
        preset=preset.name,
        params=spec.params,
        memory=spec.memory,
        memory_files=tuple(str(path) for path in memory_files),
        num_memory_clips=result.num_memory_clips,
        encoder_version=version,
        timings_s=result.timings,
    )
    record_path = atomic_write_text(video.with_suffix(".json"), record.model_dump_json(indent=2))
    return GenerationOutput(video=video, record_path=record_path, record=record)
