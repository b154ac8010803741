"""The real preset's loader, run on a Wan2.1 Diffusers folder written from the tiny components.

Same code path as real weights (``from_pretrained`` per subfolder, dtype choices, the DiT-Mem
checkpoint), only smaller.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import WanPipeline

from model.errors import WeightsNotFound
from model.loading import load_pipeline, save_memory_encoder
from model.tiny import build_tiny_components


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("weights")
    components = build_tiny_components(0)
    encoder = components.pop("memory_encoder")
    WanPipeline(**components).save_pretrained(root / "wan")
    save_memory_encoder(encoder, root / "dit-mem")
    return root / "wan", root / "dit-mem"


def _generate(pipe) -> np.ndarray:
    return pipe(
        "a red ball",
        height=64,
        width=64,
        num_frames=9,
        num_inference_steps=2,
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(0),
    ).frames[0]


def test_loads_every_component_from_the_folder(weights):
    wan_path, dit_mem_path = weights
    pipe = load_pipeline(
        "wan2.1-t2v-1.3b", wan_path=wan_path, dit_mem_path=dit_mem_path, device="cpu"
    )
    reference = build_tiny_components(0)

    for name in ("transformer", "vae", "text_encoder", "memory_encoder"):
        loaded, expected = getattr(pipe, name).state_dict(), reference[name].state_dict()
        assert loaded.keys() == expected.keys(), name
        assert all(torch.equal(loaded[k].float(), expected[k].float()) for k in expected), name
    assert pipe.vae.use_tiling  # on by default: decode is where long videos run out of memory
    assert pipe.scheduler.config.flow_shift == 3.0
    assert pipe.memory_encoder.fingerprint() == reference["memory_encoder"].fingerprint()


def test_generates_like_the_pipeline_built_in_memory(weights):
    from model.pipeline import MemoryWanPipeline

    wan_path, dit_mem_path = weights
    loaded = load_pipeline(
        "wan2.1-t2v-1.3b",
        wan_path=wan_path,
        dit_mem_path=dit_mem_path,
        device="cpu",
        vae_tiling=False,
    )
    built = MemoryWanPipeline(**build_tiny_components(0))
    np.testing.assert_allclose(_generate(loaded), _generate(built), atol=1e-5)


@pytest.mark.parametrize(
    "missing", ["model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler"]
)
def test_an_incomplete_folder_names_what_is_missing(weights, tmp_path, missing):
    wan_path, dit_mem_path = weights
    partial = tmp_path / "wan"
    partial.mkdir()
    for entry in wan_path.iterdir():
        if entry.name != missing:
            (partial / entry.name).symlink_to(entry)
    with pytest.raises(WeightsNotFound, match=missing):
        load_pipeline("wan2.1-t2v-1.3b", wan_path=partial, dit_mem_path=dit_mem_path, device="cpu")


def test_missing_dit_mem_checkpoint_is_named(weights, tmp_path):
    wan_path, _ = weights
    with pytest.raises(WeightsNotFound, match="DiT-Mem-1.3B.safetensors"):
        load_pipeline(
            "wan2.1-t2v-1.3b", wan_path=wan_path, dit_mem_path=tmp_path / "nope", device="cpu"
        )
