"""The toy preset's pieces: pixel-space VAE, frame count through WanPipeline, token shapes, and
the shipped weights as a diffusers pipeline folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.encoder import MemoryEncoder
from model.errors import InvalidRequest, WeightsNotFound
from model.loading import (
    load_memory_encoder,
    load_pipeline,
    official_state_dict,
    save_memory_encoder,
)
from model.pipeline import MemoryWanPipeline
from model.presets import TOY
from model.tiny import offline_tokenizer
from model.toy.components import (
    ENCODER_DIR,
    MAX_SEQUENCE_LENGTH,
    TEXT_ENCODER_DIR,
    TRANSFORMER_FILE,
    WEIGHTS_DIR,
    PixelSpaceVAE,
    build_toy_components,
    new_memory_encoder,
    new_text_encoder,
    new_transformer,
    save_text_encoder,
    toy_scheduler,
    write_pipeline_files,
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
    # Frame counts the transformer cannot patch are refused up front, not a crash mid-job.
    for frames in (4, 12, 16):
        with pytest.raises(InvalidRequest, match="num_frames"):
            TOY.check(height=16, width=16, num_frames=frames, steps=16, guidance_scale=3.0)


# -- the shipped pipeline folder ------------------------------------------------------------------


def _toy_frames(pipe: MemoryWanPipeline, memory=None) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        ["a red ball", "a blue ball"],
        memory=memory,
        memory_guidance=True,
        height=SIZE,
        width=SIZE,
        num_frames=FRAMES,
        num_inference_steps=4,
        guidance_scale=TOY.guidance_scale,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).frames


def _same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
    )


def test_toy_preset_loads_the_pipeline_folder_like_components_built_by_hand(monkeypatch) -> None:
    calls = []
    original = MemoryWanPipeline.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(args)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(MemoryWanPipeline, "from_pretrained", classmethod(spy))
    loaded = load_pipeline("toy", device="cpu")
    assert [Path(args[0]) for args in calls] == [WEIGHTS_DIR] == [TOY.weights_dir]
    assert isinstance(loaded.vae, PixelSpaceVAE)
    assert isinstance(loaded.memory_encoder, MemoryEncoder)
    assert loaded.tokenizer.model_max_length == MAX_SEQUENCE_LENGTH
    assert loaded.scheduler.config.flow_shift == TOY.flow_shift

    built = MemoryWanPipeline(**build_toy_components())
    for name in ("transformer", "text_encoder", "memory_encoder"):
        assert _same_tensors(getattr(loaded, name), getattr(built, name)), name
    shipped = load_file(WEIGHTS_DIR / TRANSFORMER_FILE)
    assert all(torch.equal(loaded.transformer.state_dict()[k], v) for k, v in shipped.items())

    generator = torch.Generator().manual_seed(2)
    clips = render([sample_spec(generator) for _ in range(3)])
    memory = [loaded.resample_clips(clips)] * 2
    assert torch.equal(_toy_frames(loaded, memory), _toy_frames(built, memory))
    assert torch.equal(_toy_frames(loaded), _toy_frames(built))


def test_an_exported_toy_folder_is_served_as_it_is(tmp_path) -> None:
    """What `ditmem toy train` writes (backbone export + encoder + code-made parts) loads."""
    from model.toy.backbone import export_transformer

    pipe = random_toy_pipe()
    folder = tmp_path / "weights"
    export_transformer(pipe.transformer, folder / TRANSFORMER_FILE)
    save_text_encoder(pipe.text_encoder, folder / TEXT_ENCODER_DIR)
    save_memory_encoder(pipe.memory_encoder, folder / ENCODER_DIR)
    write_pipeline_files(pipe, folder)

    served = load_pipeline("toy", wan_path=folder, device="cpu")
    built = MemoryWanPipeline(**build_toy_components(folder))
    assert _same_tensors(served.transformer, pipe.transformer)
    assert _same_tensors(served.memory_encoder, pipe.memory_encoder)
    for name in ("transformer", "text_encoder", "memory_encoder"):
        assert _same_tensors(getattr(served, name), getattr(built, name)), name
    assert torch.equal(_toy_frames(served), _toy_frames(built))


def test_toy_dit_mem_path_replaces_the_folder_encoder(tmp_path) -> None:
    """A bare official-layout checkpoint takes its architecture from the folder's encoder."""
    shipped = load_memory_encoder(WEIGHTS_DIR / ENCODER_DIR)
    other = new_memory_encoder(seed=5)
    save_file(official_state_dict(other), tmp_path / "dit_mem.safetensors")

    pipe = load_pipeline("toy", dit_mem_path=tmp_path / "dit_mem.safetensors", device="cpu")
    params = dict(pipe.memory_encoder.named_parameters())
    assert params.keys() == dict(shipped.named_parameters()).keys()
    assert all(torch.equal(params[k], p) for k, p in other.named_parameters())
    assert not _same_tensors(pipe.memory_encoder, shipped)


def test_a_missing_toy_folder_says_how_to_make_one(tmp_path) -> None:
    with pytest.raises(WeightsNotFound, match="ditmem toy train"):
        load_pipeline("toy", wan_path=tmp_path / "nope", device="cpu")
    with pytest.raises(WeightsNotFound, match="ditmem toy train"):
        build_toy_components(tmp_path)


def test_pixel_space_vae_folder_is_its_config(tmp_path) -> None:
    vae = PixelSpaceVAE(latents_std=(0.25, 0.25, 0.25))
    vae.save_pretrained(tmp_path / "vae")
    assert [p.name for p in (tmp_path / "vae").iterdir()] == ["config.json"]
    loaded = PixelSpaceVAE.from_pretrained(tmp_path, subfolder="vae", dtype=torch.bfloat16)
    assert list(loaded.config.latents_std) == [0.25, 0.25, 0.25]
    loaded.enable_tiling()  # the AutoencoderKLWan interface; nothing to tile
    assert loaded.use_tiling
