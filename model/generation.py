"""One generation request end to end: parameters -> memory tokens -> frames.

Shared by the CLI, the embedded service and the GPU workers, so a request behaves the same
wherever it runs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.errors import InvalidRequest
from model.pipeline import CancelCheck, MemoryWanPipeline, ProgressCallback
from model.preprocess import load_memory_clip
from model.presets import Preset
from model.tokens import ClipTokens

MAX_PROMPT_CHARS = 2000


@dataclass(frozen=True)
class GenerationParams:
    """Fully resolved parameters of one video (preset defaults filled in, bounds checked)."""

    prompt: str
    negative_prompt: str
    height: int
    width: int
    num_frames: int
    steps: int
    guidance_scale: float
    seed: int
    memory_guidance: bool

    @classmethod
    def resolve(
        cls,
        preset: Preset,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        memory_guidance: bool | None = None,
    ) -> GenerationParams:
        """Fill unset fields from ``preset`` and validate; raises :class:`InvalidRequest`."""
        if not prompt or not prompt.strip():
            raise InvalidRequest("prompt must not be empty")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InvalidRequest(
                f"prompt is {len(prompt)} characters, the limit is {MAX_PROMPT_CHARS}"
            )
        params = cls(
            prompt=prompt.strip(),
            negative_prompt=preset.negative_prompt if negative_prompt is None else negative_prompt,
            height=preset.height if height is None else height,
            width=preset.width if width is None else width,
            num_frames=preset.num_frames if num_frames is None else num_frames,
            steps=preset.steps if steps is None else steps,
            guidance_scale=preset.guidance_scale if guidance_scale is None else guidance_scale,
            seed=int(torch.seed() % 2**31) if seed is None else seed,
            memory_guidance=(
                preset.memory_guidance if memory_guidance is None else bool(memory_guidance)
            ),
        )
        preset.check(
            height=params.height,
            width=params.width,
            num_frames=params.num_frames,
            steps=params.steps,
            guidance_scale=params.guidance_scale,
        )
        return params

    @classmethod
    def from_request(cls, preset: Preset, request: Mapping[str, Any]) -> GenerationParams:
        """:meth:`resolve` from an API request body (``prompt``, ``num_frames``, ``steps`` ...)."""
        return cls.resolve(
            preset,
            request.get("prompt") or "",
            **{name: request.get(name) for name in REQUEST_FIELDS},
        )


# Optional request fields, named as in the API, and the keyword :meth:`resolve` takes for each.
REQUEST_FIELDS = (
    "negative_prompt", "height", "width", "num_frames", "steps", "guidance_scale", "seed",
    "memory_guidance",
)  # fmt: skip


@dataclass
class GenerationResult:
    """Frames plus the record a user needs to reproduce them."""

    frames: np.ndarray  # (F, H, W, 3) float32 in [0, 1]
    params: GenerationParams
    num_memory_clips: int
    timings: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict:
        return {
            "params": asdict(self.params),
            "num_memory_clips": self.num_memory_clips,
            "timings_s": self.timings,
        }


def clip_tokens_from_files(
    pipe: MemoryWanPipeline, preset: Preset, paths: Sequence[str | Path]
) -> ClipTokens:
    """Decode, canonicalise and encode reference clips into their cached per-clip tokens."""
    videos = torch.stack([load_memory_clip(p, preset) for p in paths])
    return pipe.resample_clips(videos)


def generate(
    pipe: MemoryWanPipeline,
    preset: Preset,
    params: GenerationParams,
    memory: ClipTokens | None = None,
    *,
    on_progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
) -> GenerationResult:
    """Run the pipeline for one prompt; ``memory`` holds the tokens of the retrieved clips."""
    started = time.perf_counter()
    generator = torch.Generator(device="cpu").manual_seed(params.seed)
    output = pipe(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt or None,
        memory=memory,
        memory_guidance=params.memory_guidance,
        height=params.height,
        width=params.width,
        num_frames=params.num_frames,
        num_inference_steps=params.steps,
        guidance_scale=params.guidance_scale,
        generator=generator,
        max_sequence_length=preset.max_sequence_length,
        output_type="np",
        on_progress=on_progress,
        should_cancel=should_cancel,
    )
    return GenerationResult(
        frames=output.frames[0],
        params=params,
        num_memory_clips=0 if memory is None else memory.num_clips,
        timings={"total": time.perf_counter() - started},
    )
