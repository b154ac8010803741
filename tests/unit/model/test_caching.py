"""Step caches with memory (tiny preset), for each kind: a cache that never skips (threshold 0,
interval 1) changes no bit, a cache that skips still lets the memory change the output, and no
cached state outlives its call (not even a cancelled one), so no request reuses another's
residuals."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from model.caching import CacheSpec, counting_passes
from model.errors import GenerationCancelled, InvalidRequest
from model.generation import GenerationParams
from model.pipeline import MemoryWanPipeline
from model.presets import TINY
from model.tiny import build_tiny_components

STEPS, FRAMES, SIZE = 6, 9, 64
SKIPPING = CacheSpec(kind="first-block", threshold=0.9)
NEVER_SKIPPING = [
    CacheSpec(kind="first-block", threshold=0),
    CacheSpec(kind="mag", threshold=0),
    CacheSpec(kind="taylorseer", interval=1),
]
ALWAYS_SKIPPING = [
    SKIPPING,
    CacheSpec(kind="mag", threshold=0.5),
    CacheSpec(kind="taylorseer", interval=3),
]


def run(pipe, memory=None, cache=None, seed=0, **kwargs) -> tuple[torch.Tensor, int]:
    with counting_passes(pipe.transformer) as counter:
        latents = pipe(
            "a red ball falls", "blurry", memory=memory, cache=cache,
            num_inference_steps=STEPS, guidance_scale=5.0, num_frames=FRAMES, height=SIZE,
            width=SIZE, max_sequence_length=TINY.max_sequence_length,
            generator=torch.Generator().manual_seed(seed), output_type="latent", **kwargs,
        ).frames  # fmt: skip
    return latents, counter.passes


@pytest.fixture(autouse=True, scope="module")
def measured_mag_ratios(pipe):
    """MagCache's ratios measured up front, so the passes counted below are the request's."""
    pipe.mag_ratios(STEPS, {"height": SIZE, "width": SIZE, "num_frames": FRAMES})


@pytest.mark.parametrize("cache", NEVER_SKIPPING, ids=lambda spec: spec.kind)
@pytest.mark.parametrize("memory_guidance", [False, True])
def test_a_cache_that_never_skips_changes_no_bit(pipe, clip_tokens, cache, memory_guidance):
    plain, plain_passes = run(pipe, clip_tokens, memory_guidance=memory_guidance)
    cached, cached_passes = run(pipe, clip_tokens, cache, memory_guidance=memory_guidance)
    assert torch.equal(plain, cached)
    assert plain_passes == cached_passes == 2 * STEPS  # both guidance branches, every step


@pytest.mark.parametrize("cache", ALWAYS_SKIPPING, ids=lambda spec: spec.kind)
def test_a_skipping_cache_runs_fewer_passes_and_memory_still_matters(pipe, clip_tokens, cache):
    with_memory, passes = run(pipe, clip_tokens, cache)
    without, _ = run(pipe, None, cache)
    full, _ = run(pipe, clip_tokens)
    assert passes < 2 * STEPS, passes  # it skipped
    assert (with_memory - without).abs().max() > 1e-4  # the memory still changes the video
    assert (with_memory - full).abs().max() > 0  # and skipping changed it a little


def test_mag_ratios_are_measured_once_per_shape_without_any_request_s_memory(pipe, clip_tokens):
    shape = {"height": SIZE, "width": SIZE, "num_frames": FRAMES}
    ratios = pipe.mag_ratios(STEPS, shape)
    assert len(ratios) == STEPS and ratios[0] == 1.0
    assert all(0.5 < r < 2 for r in ratios), ratios
    assert pipe.mag_ratios(STEPS, shape) is ratios  # measured once
    assert pipe.mag_ratios(STEPS + 1, shape) is not ratios  # per step count
    # The first request's memory played no part: a fresh pipeline measures the same numbers.
    fresh = MemoryWanPipeline(**build_tiny_components(0))
    fresh.set_progress_bar_config(disable=True)
    assert fresh.mag_ratios(STEPS, shape) == ratios


@pytest.mark.parametrize("cache", ALWAYS_SKIPPING, ids=lambda spec: spec.kind)
def test_no_cached_state_outlives_a_call_even_a_cancelled_one(pipe, clip_tokens, cache):
    first, _ = run(pipe, clip_tokens, cache)

    def cancel_after_two(step: int, total: int) -> None:
        if step == 2:
            raise GenerationCancelled("stop")

    with pytest.raises(GenerationCancelled):
        run(pipe, None, cache, seed=9, on_progress=cancel_after_two)
    assert not pipe.transformer.is_cache_enabled
    again, _ = run(pipe, clip_tokens, cache)
    assert torch.equal(first, again)  # nothing of the cancelled request's residuals was used


def test_cache_specs_are_validated():
    assert CacheSpec(kind="first-block").resolved().threshold == 0.05
    assert CacheSpec(kind="mag").resolved().threshold == 0.06
    assert CacheSpec(kind="taylorseer").resolved().interval == 2
    assert not CacheSpec().active and CacheSpec().resolved() == CacheSpec()
    for bad in (
        {"kind": "tea"}, {"kind": "first-block", "threshold": 1.5}, {"colour": 1},
        {"kind": "taylorseer", "threshold": 0.1}, {"kind": "mag", "interval": 2},
        {"kind": "taylorseer", "interval": 0}, {"threshold": 0.1},
    ):  # fmt: skip
        with pytest.raises(ValidationError):
            CacheSpec.model_validate(bad)


def test_a_cache_is_refused_under_the_reference_profile(pipe):
    """The reference profile exists to compute exactly what the reference computes."""
    with pytest.raises(InvalidRequest, match="reference profile") as raised:
        GenerationParams.resolve(TINY, "a ball", profile="reference", cache=SKIPPING)
    assert raised.value.field == "cache"
    with pytest.raises(InvalidRequest, match="reference profile"):
        run(pipe, None, SKIPPING, profile="reference")
    assert not pipe.transformer.is_cache_enabled
