"""Offload and quantisation with memory (tiny preset, CPU): group and model offload give the
output of no offload, with the memory tokens found where each offloaded block runs; int8 weights
project the memory tokens too and keep the memory's effect; impossible choices fail before any
weight moves."""

from __future__ import annotations

import pytest
import torch

from model.caching import CacheSpec, counting_passes
from model.pipeline import MemoryWanPipeline
from model.placement import Placement, UnsupportedPlacement, check_placement, place_pipeline
from model.presets import TINY
from model.tiny import build_tiny_components
from runtime.settings import Settings

CPU = torch.device("cpu")
STEPS, FRAMES, SIZE = 4, 9, 64


def placed(placement: Placement) -> MemoryWanPipeline:
    pipe = MemoryWanPipeline(**build_tiny_components(0))
    pipe.set_progress_bar_config(disable=True)
    place_pipeline(pipe, placement, CPU)
    return pipe


def run(pipe: MemoryWanPipeline, memory=None, cache=None) -> torch.Tensor:
    return pipe(
        "a red ball falls", "blurry", memory=memory, cache=cache, num_inference_steps=STEPS,
        guidance_scale=5.0, num_frames=FRAMES, height=SIZE, width=SIZE,
        max_sequence_length=TINY.max_sequence_length, generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).frames  # fmt: skip


@pytest.fixture(scope="module")
def reference(clip_tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Videos of the unplaced pipeline, with and without memory."""
    pipe = placed(Placement())
    return torch.as_tensor(run(pipe, clip_tokens)), torch.as_tensor(run(pipe))


@pytest.mark.parametrize(
    "placement",
    [Placement(offload="group"), Placement(offload="group", group_blocks=2),
     Placement(offload="model")],
    ids=lambda placement: placement.label,
)  # fmt: skip
def test_offload_gives_the_output_of_no_offload(placement, clip_tokens, reference, tmp_path):
    pipe = placed(placement.model_copy(update={"offload_dir": tmp_path}))
    with_memory = torch.as_tensor(run(pipe, clip_tokens))
    # Equal to float32 rounding, not bit for bit: weights read back from their files sit at
    # other alignments, so CPU kernels vectorise (and sum) differently.
    torch.testing.assert_close(with_memory, reference[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.as_tensor(run(pipe)), reference[1], rtol=0, atol=1e-5)
    assert (with_memory - reference[1]).abs().max() > 1e-3  # the memory still steers it
    # The weights really left: every component with weights has its files.
    folders = {p.parent.name for p in tmp_path.rglob("*.safetensors")}
    assert {"transformer", "text_encoder", "vae"} <= folders, folders
    assert "memory_encoder" not in folders  # it stays where it runs


def test_int8_weights_project_the_memory_tokens_and_keep_its_effect(clip_tokens, reference):
    pipe = placed(Placement(quantize="int8"))
    to_k = pipe.transformer.blocks[0].attn1.to_k
    assert type(to_k.weight).__name__ == "Int8Tensor"  # torchao's int8 weights
    assert pipe.transformer.proj_out.weight.dtype == torch.float32  # outside the blocks: kept
    assert next(pipe.memory_encoder.parameters()).dtype == torch.float32
    lengths = []
    handle = to_k.register_forward_hook(lambda _m, args, _o: lengths.append(args[0].shape[1]))
    try:
        with_memory = torch.as_tensor(run(pipe, clip_tokens))
    finally:
        handle.remove()
    memory_tokens = pipe.encode_memory(clip_tokens).tokens.shape[1]
    assert memory_tokens in lengths  # the memory went through the quantised projection
    without = torch.as_tensor(run(pipe))
    assert 0 < (with_memory - reference[0]).abs().max() < 0.05  # int8 rounding, small
    assert (with_memory - without).abs().max() > 1e-3  # and the memory still steers it


@pytest.mark.parametrize(
    "placement", [Placement(offload="group"), Placement(quantize="int8")],
    ids=lambda placement: placement.label,
)  # fmt: skip
def test_a_step_cache_on_a_placed_model_skips_and_keeps_the_memory(placement, clip_tokens,
                                                                    tmp_path):  # fmt: skip
    pipe = placed(placement.model_copy(update={"offload_dir": tmp_path}))
    cache = CacheSpec(kind="taylorseer", interval=3)
    with counting_passes(pipe.transformer) as counter:
        with_memory = torch.as_tensor(run(pipe, clip_tokens, cache=cache))
    assert counter.passes < 2 * STEPS, counter.passes
    without = torch.as_tensor(run(pipe, None, cache=cache))
    assert (with_memory - without).abs().max() > 1e-3
    assert not pipe.transformer.is_cache_enabled


@pytest.mark.parametrize(
    ("placement", "message"),
    [
        (Placement(quantize="fp8"), "fp8 weights need a CUDA GPU"),
        (Placement(offload="group", streams=True), "CUDA device"),
        (Placement(offload="none", streams=True), "DITMEM_OFFLOAD=group"),
        (Placement(offload="group", quantize="int8"), "not both"),
    ],
    ids=["fp8-on-cpu", "streams-on-cpu", "streams-without-group", "int8-and-offload-on-cpu"],
)
def test_impossible_choices_fail_before_anything_moves(placement, message):
    with pytest.raises(UnsupportedPlacement, match=message):
        check_placement(placement, CPU)
    pipe = MemoryWanPipeline(**build_tiny_components(0))
    weight = pipe.transformer.blocks[0].attn1.to_k.weight
    with pytest.raises(UnsupportedPlacement):
        place_pipeline(pipe, placement, CPU)
    assert pipe.transformer.blocks[0].attn1.to_k.weight is weight  # nothing was touched


def test_settings_name_the_placement():
    settings = Settings(offload="group", offload_group_blocks=3, quantize="none")
    assert settings.placement == Placement(offload="group", group_blocks=3)
    assert Settings(cpu_offload=True).placement.offload == "model"  # the older setting
    assert Placement(offload="group", group_blocks=2, quantize="int8").label == "group(2)+int8"
    with pytest.raises(ValueError, match="offload"):
        Settings(offload="disk")
