"""One generation in the model's terms: resolved parameters + memory tokens -> frames.

``runtime.generation`` builds on it for the whole job (memory from the bank, the mp4 and its
record), the same for the CLI and every worker.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from model.caching import CacheSpec
from model.errors import InvalidRequest
from model.pipeline import CancelCheck, LatentsCallback, MemoryWanPipeline, ProgressCallback
from model.preprocess import load_memory_clip
from model.presets import Preset
from model.profiles import PROFILES, Profile
from model.tokens import ClipTokens

MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**31 - 1


class GenerationParams(BaseModel):
    """Fully resolved parameters of one video (preset defaults filled in, bounds checked).

    Built only by :meth:`resolve`; a job record stores it as it is, so a worker runs exactly
    what the API accepted.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str
    negative_prompt: str
    height: int
    width: int
    num_frames: int
    steps: int
    guidance_scale: float
    seed: int
    memory_guidance: bool
    profile: Profile = "default"
    cache: CacheSpec = Field(default_factory=CacheSpec)

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
        profile: Profile | None = None,
        cache: CacheSpec | None = None,
    ) -> GenerationParams:
        """Fill unset fields from ``preset`` (under the ``reference`` profile from
        ``preset.reference``: the reference's steps, guidance, negative prompt and memory in
        both guidance branches) and validate; raises :class:`InvalidRequest`."""
        if not prompt or not prompt.strip():
            raise InvalidRequest("prompt must not be empty")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InvalidRequest(
                f"prompt is {len(prompt)} characters, the limit is {MAX_PROMPT_CHARS}"
            )
        profile = preset.profile if profile is None else profile
        if profile not in PROFILES:
            raise InvalidRequest(
                f"unknown profile {profile!r}; choose one of {list(PROFILES)}", field="profile"
            )
        if profile == "reference":
            defaults = preset.reference
            default_steps, default_guidance = defaults.steps, defaults.guidance_scale
            default_negative, default_memory_guidance = defaults.negative_prompt, False
        else:
            default_steps, default_guidance = preset.steps, preset.guidance_scale
            default_negative = preset.negative_prompt
            default_memory_guidance = preset.memory_guidance
        cache = (cache or CacheSpec()).resolved()
        cache.check_profile(profile)
        params = cls(
            prompt=prompt.strip(),
            negative_prompt=default_negative if negative_prompt is None else negative_prompt,
            height=preset.height if height is None else height,
            width=preset.width if width is None else width,
            num_frames=preset.num_frames if num_frames is None else num_frames,
            steps=default_steps if steps is None else steps,
            guidance_scale=default_guidance if guidance_scale is None else guidance_scale,
            # A fresh seed from the OS: torch.seed() would also reseed the global generator.
            seed=secrets.randbelow(MAX_SEED + 1) if seed is None else seed,
            memory_guidance=(
                default_memory_guidance if memory_guidance is None else bool(memory_guidance)
            ),
            profile=profile,
            cache=cache,
        )
        preset.check(
            height=params.height,
            width=params.width,
            num_frames=params.num_frames,
            steps=params.steps,
            guidance_scale=params.guidance_scale,
        )
        return params


@dataclass
class GenerationResult:
    """Frames of one video with the parameters and timings that made them."""

    frames: np.ndarray  # (F, H, W, 3) float32 in [0, 1]
    params: GenerationParams
    num_memory_clips: int
    timings: dict[str, float] = field(default_factory=dict)


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
    on_latents: LatentsCallback | None = None,
    latents_every: int = 0,
) -> GenerationResult:
    """Run the pipeline for one prompt; ``memory`` holds the tokens of the retrieved clips."""
    started = time.perf_counter()
    generator = torch.Generator(device="cpu").manual_seed(params.seed)
    output = pipe(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt or None,
        memory=memory,
        memory_guidance=params.memory_guidance,
        profile=params.profile,
        cache=params.cache,
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
        on_latents=on_latents,
        latents_every=latents_every,
    )
    return GenerationResult(
        frames=output.frames[0],
        params=params,
        num_memory_clips=0 if memory is None else memory.num_clips,
        timings={"total": time.perf_counter() - started},
    )
