"""``MemoryWanPipeline`` end to end on the ``tiny`` preset (seeded random components, CPU).

Generation is 2 steps of 9 frames at 64x64; each call takes well under a second.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import WanPipeline

from model import injection
from model.errors import GenerationCancelled, InvalidRequest, LatentShapeError
from model.generation import GenerationParams
from model.presets import TINY, TOY
from model.tiny import build_tiny_components
from model.tokens import MemoryTokens

NUM_FRAMES, HEIGHT, WIDTH, STEPS = 9, 64, 64, 2
PROMPT = "a red ball rolling across a wooden table"
GENERATION = dict(
    num_inference_steps=STEPS,
    num_frames=NUM_FRAMES,
    height=HEIGHT,
    width=WIDTH,
    max_sequence_length=32,
    output_type="np",
)


def silence(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ``pipe`` and ``clip_tokens`` (two random 9-frame 64x64 clips) come from the conftest.


@pytest.fixture(scope="module")
def stock_pipe() -> WanPipeline:
    """diffusers' own pipeline on an independently built, identical set of components."""
    components = build_tiny_components(0)
    del components["memory_encoder"]
    return silence(WanPipeline(**components))


def generate(pipeline, seed: int = 0, prompt: str = PROMPT, **kwargs) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return pipeline(prompt, generator=generator, **GENERATION, **kwargs).frames


@pytest.fixture(scope="module")
def frames_seed0(pipe) -> np.ndarray:
    return generate(pipe, seed=0)


# -- generation -----------------------------------------------------------------------------------


def test_generates_frames_in_unit_range(frames_seed0):
    assert frames_seed0.shape == (1, NUM_FRAMES, HEIGHT, WIDTH, 3)
    assert np.isfinite(frames_seed0).all()
    assert frames_seed0.min() >= 0.0 and frames_seed0.max() <= 1.0


def test_same_seed_same_frames_other_seed_other_frames(pipe, frames_seed0):
    np.testing.assert_array_equal(generate(pipe, seed=0), frames_seed0)
    assert np.abs(generate(pipe, seed=1) - frames_seed0).max() > 1e-3


def test_without_memory_matches_stock_wan_pipeline(stock_pipe, frames_seed0):
    np.testing.assert_array_equal(generate(stock_pipe, seed=0), frames_seed0)


def test_memory_changes_the_output_and_is_switched_off_afterwards(pipe, clip_tokens, frames_seed0):
    with_memory = generate(pipe, seed=0, memory=clip_tokens)
    assert with_memory.shape == frames_seed0.shape
    assert np.abs(with_memory - frames_seed0).max() > 1e-3
    assert pipe.memory_injector.memory is None
    np.testing.assert_array_equal(generate(pipe, seed=0), frames_seed0)


def test_memory_as_clip_tokens_or_mixed_tokens_is_the_same(pipe, clip_tokens):
    mixed = pipe.encode_memory(clip_tokens)
    assert isinstance(mixed, MemoryTokens)
    counts = pipe.memory_encoder.token_counts
    width = pipe.memory_encoder.config.token_dim
    assert mixed.tokens.shape == (1, 2 * clip_tokens.num_clips * len(counts), width)
    assert mixed.num_expanded == 2 * clip_tokens.num_clips * pipe.memory_encoder.config.num_tokens
    np.testing.assert_array_equal(
        generate(pipe, seed=0, memory=mixed), generate(pipe, seed=0, memory=clip_tokens)
    )


def test_clip_tokens_have_the_tiny_layout(pipe, clip_tokens):
    # 3 latent frames pooled to 6 tokens: 3 distinct tokens, each twice.
    assert clip_tokens.counts.tolist() == [2, 2, 2]
    assert clip_tokens.high.shape == (2, 3, pipe.memory_encoder.config.token_dim)


# -- callbacks, cancellation and validation -------------------------------------------------------


def test_progress_callback_sees_every_step(pipe):
    progress: list[tuple[int, int]] = []
    generate(pipe, on_progress=lambda step, total: progress.append((step, total)))
    assert progress == [(1, STEPS), (2, STEPS)]


def test_cancel_after_first_step(pipe, clip_tokens):
    progress: list[tuple[int, int]] = []
    with pytest.raises(GenerationCancelled):
        generate(
            pipe,
            memory=clip_tokens,
            on_progress=lambda step, total: progress.append((step, total)),
            should_cancel=lambda: len(progress) >= 1,
        )
    assert progress == [(1, STEPS)]
    assert pipe.memory_injector.memory is None


def test_cancel_before_first_step(pipe):
    progress: list[tuple[int, int]] = []
    with pytest.raises(GenerationCancelled):
        generate(
            pipe,
            on_progress=lambda step, total: progress.append((step, total)),
            should_cancel=lambda: True,
        )
    assert progress == []


@pytest.mark.parametrize("prompt", ["", "   ", ["a cat", ""]], ids=["empty", "blank", "in-list"])
def test_empty_prompt_is_rejected(pipe, prompt):
    with pytest.raises(InvalidRequest):
        generate(pipe, prompt=prompt)


def test_clip_of_the_wrong_shape_is_rejected(pipe):
    encoder = pipe.memory_encoder
    wrong = torch.zeros(1, *encoder.latent_shape[:-1], encoder.latent_shape[-1] + 2)
    with pytest.raises(LatentShapeError) as excinfo:
        encoder.resample(wrong)
    assert str(encoder.latent_shape) in str(excinfo.value)
    assert str(tuple(wrong.shape[1:])) in str(excinfo.value)

    # A clip preprocessed to another geometry than the preset's memory clips.
    videos = torch.zeros(1, 3, NUM_FRAMES, HEIGHT, WIDTH + 32)
    with pytest.raises(LatentShapeError):
        pipe.resample_clips(videos)


# -- memory guidance -------------------------------------------------------------------------------

NEGATIVE = "blurry, static"


def memory_use_per_forward(pipe, clip_tokens, monkeypatch, **kwargs) -> list[tuple[str, bool]]:
    """Run a guided generation; for each transformer forward, its CFG branch (told apart by the
    text states it got) and whether any self-attention attended to memory keys."""
    cond, uncond = pipe.encode_prompt(  # the same states as in the call, up to float noise
        PROMPT, NEGATIVE, do_classifier_free_guidance=True, max_sequence_length=32
    )
    names = [("cond", cond.float()), ("uncond", uncond.float())]
    memory_calls = []
    real = injection.attention_with_extra_keys

    def spy(*args, **kw):
        memory_calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(injection, "attention_with_extra_keys", spy)
    forwards = []

    def before(module, args, kw):
        states = kw["encoder_hidden_states"].float()
        branch = next((n for n, ref in names if torch.allclose(states, ref, atol=1e-5)), "?")
        forwards.append([branch, len(memory_calls)])

    def after(module, args, kw, output):
        forwards[-1][1] = len(memory_calls) > forwards[-1][1]

    handles = [
        pipe.transformer.register_forward_pre_hook(before, with_kwargs=True),
        pipe.transformer.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        generate(pipe, negative_prompt=NEGATIVE, memory=clip_tokens, guidance_scale=4.0, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return [tuple(f) for f in forwards]


def test_memory_guidance_keeps_memory_out_of_the_unconditional_branch(
    pipe, clip_tokens, monkeypatch
):
    # The injector reads the branch from the pipeline's cache contexts, so the order in which
    # WanPipeline runs the two forwards of a step does not matter.
    forwards = memory_use_per_forward(pipe, clip_tokens, monkeypatch, memory_guidance=True)
    assert sorted(forwards) == sorted([("cond", True), ("uncond", False)] * STEPS)


def test_without_memory_guidance_both_branches_see_the_memory(pipe, clip_tokens, monkeypatch):
    forwards = memory_use_per_forward(pipe, clip_tokens, monkeypatch, memory_guidance=False)
    assert sorted(forwards) == sorted([("cond", True), ("uncond", True)] * STEPS)


def test_memory_kv_are_computed_once_per_block_per_step(pipe, clip_tokens, monkeypatch):
    calls = []
    real = injection.MemoryAttnProcessor.modulated_memory

    def counted(self, *args, **kwargs):
        calls.append(self.block_index)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(injection.MemoryAttnProcessor, "modulated_memory", counted)
    generate(pipe, negative_prompt=NEGATIVE, memory=clip_tokens, guidance_scale=4.0)
    # Both CFG branches attend to the memory; the second reuses the step's keys/values.
    assert sorted(calls) == sorted(list(range(len(pipe.transformer.blocks))) * STEPS)


def test_memory_guidance_changes_guided_output_only(pipe, clip_tokens):
    def run(scale: float, guided: bool) -> np.ndarray:
        return generate(pipe, memory=clip_tokens, guidance_scale=scale, memory_guidance=guided)

    assert not np.allclose(run(4.0, True), run(4.0, False), atol=1e-4)
    # No guidance, no unconditional branch: the option changes nothing.
    np.testing.assert_array_equal(run(1.0, True), run(1.0, False))


def test_memory_guidance_defaults_to_the_preset_and_a_request_overrides_it():
    assert GenerationParams.resolve(TOY, "a red ball").memory_guidance is True
    assert GenerationParams.resolve(TINY, "x").memory_guidance is False
    assert (
        GenerationParams.resolve(TOY, "a red ball", memory_guidance=False).memory_guidance is False
    )


# -- presets --------------------------------------------------------------------------------------

VALID = dict(height=64, width=64, num_frames=9, steps=2, guidance_scale=5.0)


def test_tiny_preset_accepts_its_defaults():
    TINY.check(**VALID)
    TINY.check(
        height=TINY.height,
        width=TINY.width,
        num_frames=TINY.num_frames,
        steps=TINY.steps,
        guidance_scale=TINY.guidance_scale,
    )


@pytest.mark.parametrize("field", ["height", "width", "num_frames", "steps", "guidance_scale"])
@pytest.mark.parametrize("side", ["below", "above"])
def test_tiny_preset_rejects_out_of_range_values(field, side):
    bounds = TINY.bounds[field]
    step = TINY.spatial_multiple if field in ("height", "width") else 1
    if field == "num_frames":
        step = TINY.frame_multiple
    value = bounds.low - step if side == "below" else bounds.high + step
    with pytest.raises(InvalidRequest, match=rf"\b{field}\b"):
        TINY.check(**{**VALID, field: value})


@pytest.mark.parametrize(("field", "value"), [("height", 72), ("width", 40), ("num_frames", 10)])
def test_tiny_preset_rejects_misaligned_geometry(field, value):
    with pytest.raises(InvalidRequest, match=rf"\b{field}\b"):
        TINY.check(**{**VALID, field: value})
