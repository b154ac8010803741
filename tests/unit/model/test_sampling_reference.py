"""The ``reference`` sampling profile against the reference implementation's own numbers.

``tests/golden/sampler_golden.json`` was made by running the reference's scheduler class and
noise initialiser; everything here must match it exactly (float32), not within a tolerance.
The last tests run a whole tiny-config denoising loop with memory and guidance through the
pipeline and compare it with the same loop written out from the fixture's rules.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.errors import InvalidRequest
from model.generation import GenerationParams
from model.pipeline import MemoryWanPipeline
from model.presets import TINY, WAN21_T2V_1_3B
from model.profiles import REFERENCE_NEGATIVE_PROMPT
from model.sampling import (
    ReferenceFlowMatchScheduler,
    as_dit_timesteps,
    reference_noise,
)

GOLDEN = json.loads((Path(__file__).parents[2] / "golden" / "sampler_golden.json").read_text())
SCHEDULES = sorted(GOLDEN["schedules"], key=int)


def f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


@pytest.mark.parametrize("steps", SCHEDULES)
def test_sigmas_and_timesteps_are_the_references_bit_for_bit(steps):
    expected = GOLDEN["schedules"][steps]
    scheduler = ReferenceFlowMatchScheduler()
    scheduler.set_timesteps(int(steps))
    sigmas = scheduler.sigmas
    assert torch.equal(sigmas[:-1], f32(expected["sigmas"]))
    assert sigmas[-1].item() == 0.0  # the final step goes to sigma 0
    assert torch.equal(sigmas[:-1] * 1000, f32(expected["timesteps"]))
    # What the pipeline hands the DiT: the reference's timestep after its cast to bf16.
    assert torch.equal(scheduler.timesteps, f32(expected["timesteps_as_fed_to_dit_bf16"]))
    assert torch.equal(as_dit_timesteps(f32(expected["timesteps"])), scheduler.timesteps)


@pytest.mark.parametrize("steps", SCHEDULES)
def test_euler_steps_are_the_references_bit_for_bit(steps):
    check = GOLDEN["schedules"][steps]["euler_check"]
    scheduler = ReferenceFlowMatchScheduler()
    scheduler.set_timesteps(int(steps))
    sample = f32(check["sample0"]).view(2, 3)
    model_output = f32(check["model_output"]).view(2, 3)
    for number, timestep in enumerate(scheduler.timesteps):
        sample = scheduler.step(model_output, timestep, sample, return_dict=False)[0]
        assert torch.equal(sample.flatten(), f32(check["after_each_step"][number])), number


def test_a_bf16_step_rounds_as_the_reference_does():
    """In bf16 the reference multiplies and adds in bf16 (two roundings)."""
    scheduler = ReferenceFlowMatchScheduler()
    scheduler.set_timesteps(4)
    sample = torch.randn(64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    output = torch.randn(64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    stepped = scheduler.step(output, scheduler.timesteps[0], sample, return_dict=False)[0]
    by_rule = sample + output * (scheduler.sigmas[1] - scheduler.sigmas[0])
    assert stepped.dtype == torch.bfloat16
    assert torch.equal(stepped, by_rule)


@pytest.mark.parametrize("name", sorted(GOLDEN["noise"]))
def test_noise_is_the_references_bit_for_bit(name):
    expected = GOLDEN["noise"][name]
    noise = reference_noise(tuple(expected["shape"]), expected["seed"])
    flat = noise.flatten()
    assert torch.equal(flat[:16], f32(expected["first_16"]))
    assert torch.equal(flat[-4:], f32(expected["last_4"]))
    digest = hashlib.sha256(noise.numpy().astype("<f4").tobytes()).hexdigest()
    assert digest == expected["sha256_float32_le"]


def test_the_reference_defaults_fill_an_unset_request():
    defaults = GOLDEN["reference_defaults"]
    script = defaults["inference/generate_videos.sh"]
    params = GenerationParams.resolve(WAN21_T2V_1_3B, "a ball", seed=1, profile="reference")
    assert params.steps == script["NUM_INFERENCE_STEPS"] == 40
    assert params.guidance_scale == defaults["pipeline __call__ defaults"]["cfg_scale"]
    assert params.negative_prompt == REFERENCE_NEGATIVE_PROMPT
    assert params.memory_guidance is False  # the reference gives both branches the memory
    explicit = GenerationParams.resolve(
        WAN21_T2V_1_3B, "a ball", seed=1, profile="reference", steps=20, negative_prompt=""
    )
    assert (explicit.steps, explicit.negative_prompt) == (20, "")
    own = GenerationParams.resolve(WAN21_T2V_1_3B, "a ball", seed=1)
    assert own.profile == "default" and own.steps == WAN21_T2V_1_3B.steps
    with pytest.raises(InvalidRequest, match="unknown profile"):
        GenerationParams.resolve(TINY, "a ball", profile="fast")  # type: ignore[arg-type]


# -- a whole denoising run ------------------------------------------------------------------------

PROMPT, NEGATIVE = "a red ball falls onto the floor", "blurry, static"
SEED, GUIDANCE, FRAMES, SIZE = 42, 5.0, 9, 64


def run_pipeline(pipe, clip_tokens, profile: str) -> torch.Tensor:
    return pipe(
        PROMPT,
        NEGATIVE,
        memory=clip_tokens,
        profile=profile,
        num_inference_steps=4,
        guidance_scale=GUIDANCE,
        num_frames=FRAMES,
        height=SIZE,
        width=SIZE,
        max_sequence_length=TINY.max_sequence_length,
        generator=torch.Generator().manual_seed(SEED),
        output_type="latent",
    ).frames


@torch.no_grad()  # as the pipeline runs: autograd would pick other attention kernels
def loop_from_the_fixture(pipe: MemoryWanPipeline, clip_tokens) -> torch.Tensor:
    """The reference's sampling written out from the fixture: its noise, its sigmas and bf16
    timesteps, CFG with the same memory in both branches, ``x + v * (sigma_next - sigma)``."""
    schedule = GOLDEN["schedules"]["4"]
    expected_noise = GOLDEN["noise"]["seed42_1x16x3x8x8"]
    latents = reference_noise(tuple(expected_noise["shape"]), SEED)
    digest = hashlib.sha256(latents.numpy().astype("<f4").tobytes()).hexdigest()
    assert digest == expected_noise["sha256_float32_le"]
    positive, negative = pipe.encode_prompt(
        PROMPT, NEGATIVE, max_sequence_length=TINY.max_sequence_length, device="cpu"
    )
    sigmas = schedule["sigmas"] + [0.0]
    tokens = pipe.encode_memory(clip_tokens)
    with pipe.memory_injector.use(tokens, conditional_only=False):
        for number, timestep in enumerate(schedule["timesteps_as_fed_to_dit_bf16"]):
            t = torch.tensor([timestep])
            cond = pipe.transformer(latents, t, positive, return_dict=False)[0]
            uncond = pipe.transformer(latents, t, negative, return_dict=False)[0]
            velocity = uncond + GUIDANCE * (cond - uncond)
            step = f32(sigmas[number + 1]) - f32(sigmas[number])
            latents = latents + velocity * step
    return latents


def test_a_tiny_run_with_memory_and_guidance_is_the_fixture_loop(pipe, clip_tokens):
    expected = loop_from_the_fixture(pipe, clip_tokens)
    got = run_pipeline(pipe, clip_tokens, "reference")
    assert got.shape == expected.shape == (1, 16, 3, 8, 8)
    assert torch.equal(got, expected), (got - expected).abs().max()
    # The run could tell the profiles apart: diffusers' UniPC on its own schedule differs.
    assert (run_pipeline(pipe, clip_tokens, "default") - expected).abs().max() > 1e-3
    # And the memory mattered in it.
    assert (run_pipeline(pipe, None, "reference") - expected).abs().max() > 1e-4


def test_the_folders_scheduler_is_back_after_a_reference_run(pipe, clip_tokens):
    own = pipe.scheduler
    run_pipeline(pipe, clip_tokens, "reference")
    assert pipe.scheduler is own
    assert pipe._noise_dtype is None


def test_an_unknown_profile_is_refused_before_any_work(pipe):
    with pytest.raises(InvalidRequest, match="unknown profile"):
        pipe(PROMPT, profile="fast", num_inference_steps=1)


def test_reference_frames_through_generate_are_seeded(pipe):
    from model.generation import generate

    params = GenerationParams.resolve(TINY, PROMPT, seed=SEED, profile="reference")
    first = generate(pipe, TINY, params).frames
    again = generate(pipe, TINY, params).frames
    np.testing.assert_array_equal(first, again)
    assert params.steps == TINY.reference.steps == 4
