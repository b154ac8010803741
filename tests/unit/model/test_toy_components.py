"""The toy preset's pieces: pixel-space VAE, frame count through WanPipeline, token shapes."""

from __future__ import annotations

import torch

from model.pipeline import MemoryWanPipeline
from model.presets import TOY
from model.tiny import offline_tokenizer
from model.toy.components import (
    MAX_SEQUENCE_LENGTH,
    PixelSpaceVAE,
    new_memory_encoder,
    new_text_encoder,
    new_transformer,
    toy_scheduler,
)
from model.toy.world import FRAMES, SIZE, render, sample_spec


def random_toy_pipe() -> MemoryWanPipeline:
    tokenizer = offline_tokenizer()
    tokenizer.model_max_length = MAX_SEQUENCE_LENGTH
    pipe = MemoryWanPipeline(
        tokenizer=tokenizer,
        text_encoder=new_text_encoder().eval(),
        vae=PixelSpaceVAE(),
        scheduler=toy_scheduler(),
        transformer=new_transformer().eval(),
        memory_encoder=new_memory_encoder().eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pixel_space_vae_latents_are_the_pixels_with_black_at_zero() -> None:
    pipe = random_toy_pipe()
    generator = torch.Generator().manual_seed(0)
    videos = render([sample_spec(generator) for _ in range(3)])
    latents = pipe.encode_clip_latents(videos)
    std = pipe.vae.config.latents_std[0]
    torch.testing.assert_close(latents, (videos + 1.0) / std)
    assert latents.shape[1:] == pipe.memory_encoder.latent_shape
    assert latents.min() == 0.0  # the black background
    decoded = pipe.vae.decode(latents * std - 1.0, return_dict=False)[0]
    torch.testing.assert_close(decoded, videos)


def test_pipeline_makes_exactly_the_requested_frames_and_uses_memory(caplog) -> None:
    pipe = random_toy_pipe()
    generator = torch.Generator().manual_seed(1)
    clips = pipe.resample_clips(render([sample_spec(generator) for _ in range(2)]))
    common = dict(
        height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=2,
        guidance_scale=1.0, max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="pt",
    )  # fmt: skip
    plain = pipe("a red ball", generator=torch.Generator().manual_seed(0), **common).frames
    steered = pipe(
        "a red ball", memory=clips, generator=torch.Generator().manual_seed(0), **common
    ).frames
    assert plain.shape == (1, FRAMES, 3, SIZE, SIZE)
    assert not torch.allclose(plain, steered)
    assert "divisible" not in caplog.text  # the frame-rounding warning is not shown to users


def test_toy_preset_bounds() -> None:
    TOY.check(height=16, width=16, num_frames=8, steps=16, guidance_scale=3.0)
    assert TOY.display_scale > 1
