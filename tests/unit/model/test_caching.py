"""Step caches with memory (tiny preset): a threshold of 0 changes no bit, a cache that skips
still lets the memory change the output, and no cached state outlives its call (not even a
cancelled one), so no request reuses another's residuals."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from model.caching import CacheSpec, counting_passes
from model.errors import GenerationCancelled
from model.presets import TINY

STEPS, FRAMES, SIZE = 6, 9, 64
SKIPPING = CacheSpec(kind="first-block", threshold=0.9)


def run(pipe, memory=None, cache=None, seed=0, **kwargs) -> tuple[torch.Tensor, int]:
    with counting_passes(pipe.transformer) as counter:
        latents = pipe(
            "a red ball falls", "blurry", memory=memory, cache=cache,
            num_inference_steps=STEPS, guidance_scale=5.0, num_frames=FRAMES, height=SIZE,
            width=SIZE, max_sequence_length=TINY.max_sequence_length,
            generator=torch.Generator().manual_seed(seed), output_type="latent", **kwargs,
        ).frames  # fmt: skip
    return latents, counter.passes


@pytest.mark.parametrize("memory_guidance", [False, True])
def test_a_threshold_of_zero_changes_no_bit(pipe, clip_tokens, memory_guidance):
    plain, plain_passes = run(pipe, clip_tokens, memory_guidance=memory_guidance)
    cached, cached_passes = run(pipe, clip_tokens, CacheSpec(kind="first-block", threshold=0),
                                memory_guidance=memory_guidance)  # fmt: skip
    assert torch.equal(plain, cached)
    assert plain_passes == cached_passes == 2 * STEPS  # both guidance branches, every step


def test_a_skipping_cache_runs_fewer_passes_and_memory_still_matters(pipe, clip_tokens):
    with_memory, passes = run(pipe, clip_tokens, SKIPPING)
    without, _ = run(pipe, None, SKIPPING)
    full, _ = run(pipe, clip_tokens)
    assert passes < 2 * STEPS, passes  # it skipped
    assert (with_memory - without).abs().max() > 1e-4  # the memory still changes the video
    assert (with_memory - full).abs().max() > 0  # and skipping changed it a little


def test_no_cached_state_outlives_a_call_even_a_cancelled_one(pipe, clip_tokens):
    first, _ = run(pipe, clip_tokens, SKIPPING)

    def cancel_after_two(step: int, total: int) -> None:
        if step == 2:
            raise GenerationCancelled("stop")

    with pytest.raises(GenerationCancelled):
        run(pipe, None, SKIPPING, seed=9, on_progress=cancel_after_two)
    assert not pipe.transformer.is_cache_enabled
    again, _ = run(pipe, clip_tokens, SKIPPING)
    assert torch.equal(first, again)  # nothing of the cancelled request's residuals was used


def test_cache_specs_are_validated():
    assert CacheSpec(kind="first-block").resolved().threshold == 0.05
    assert not CacheSpec().active and CacheSpec().resolved() == CacheSpec()
    for bad in ({"kind": "mag"}, {"kind": "first-block", "threshold": 1.5}, {"colour": 1}):
        with pytest.raises(ValidationError):
            CacheSpec.model_validate(bad)
