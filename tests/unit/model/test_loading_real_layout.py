"""The real preset's loader, run on a Wan2.1 Diffusers folder written from the tiny components.

Same code path as real weights (``MemoryWanPipeline.from_pretrained`` with per-component dtypes,
the preset's flow shift, the DiT-Mem checkpoint), only smaller.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import WanPipeline

import model.loading
from model.errors import WeightsNotFound
from model.loading import component_dtypes, load_pipeline, save_memory_encoder
from model.pipeline import MemoryWanPipeline
from model.presets import TINY, TOY, WAN21_T2V_1_3B
from model.tiny import build_tiny_components

# The folder's scheduler has its own shift; the preset's (3.0) must win.
FOLDER_FLOW_SHIFT = 5.0


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("weights")
    components = build_tiny_components(0)
    encoder = components.pop("memory_encoder")
    WanPipeline(**components).save_pretrained(root / "wan")
    scheduler_config = root / "wan" / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler_config.read_text())
    scheduler_config.write_text(json.dumps(config | {"flow_shift": FOLDER_FLOW_SHIFT}))
    save_memory_encoder(encoder, root / "dit-mem")
    return root / "wan", root / "dit-mem"


@pytest.fixture
def from_pretrained_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple, dict]]:
    """Records every ``MemoryWanPipeline.from_pretrained`` call (and still makes it)."""
    calls = []
    original = MemoryWanPipeline.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append((args, kwargs))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(MemoryWanPipeline, "from_pretrained", classmethod(spy))
    return calls


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


def test_loads_every_component_from_the_folder(weights, from_pretrained_calls):
    wan_path, dit_mem_path = weights
    pipe = load_pipeline(
        "wan2.1-t2v-1.3b", wan_path=wan_path, dit_mem_path=dit_mem_path, device="cpu"
    )
    reference = build_tiny_components(0)

    # One diffusers pipeline load; the DiT-Mem encoder and the re-shifted scheduler are passed.
    [(args, kwargs)] = from_pretrained_calls
    assert Path(args[0]) == wan_path
    assert kwargs["dtype"] == {"default": torch.float32}  # on the CPU
    assert kwargs["memory_encoder"] is pipe.memory_encoder
    assert kwargs["scheduler"] is pipe.scheduler

    for name in ("transformer", "vae", "text_encoder", "memory_encoder"):
        loaded, expected = getattr(pipe, name).state_dict(), reference[name].state_dict()
        assert loaded.keys() == expected.keys(), name
        assert all(torch.equal(loaded[k].float(), expected[k].float()) for k in expected), name
    assert pipe.vae.use_tiling  # on by default: decode is where long videos run out of memory
    assert pipe.scheduler.config.flow_shift == WAN21_T2V_1_3B.flow_shift != FOLDER_FLOW_SHIFT
    assert pipe.memory_encoder.fingerprint() == reference["memory_encoder"].fingerprint()


def test_gpu_dtypes_come_from_the_preset():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert component_dtypes(WAN21_T2V_1_3B, cuda) == {
        "transformer": torch.bfloat16,
        "text_encoder": torch.bfloat16,
        "vae": torch.float32,
        "default": torch.float32,
    }
    for preset in (WAN21_T2V_1_3B, TOY, TINY):
        assert component_dtypes(preset, cpu) == {"default": torch.float32}
    assert component_dtypes(TOY, cuda) == {"default": torch.float32}


def test_from_pretrained_gives_each_component_its_dtype(weights, monkeypatch):
    """What a GPU host gets (DiT and text encoder in bf16, VAE and encoder in float32), on CPU."""
    wan_path, dit_mem_path = weights
    monkeypatch.setattr(
        model.loading,
        "component_dtypes",
        lambda preset, device: component_dtypes(preset, torch.device("cuda")),
    )
    pipe = load_pipeline(
        "wan2.1-t2v-1.3b", wan_path=wan_path, dit_mem_path=dit_mem_path, device="cpu"
    )
    assert pipe.transformer.dtype == torch.bfloat16
    assert pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float32
    assert pipe.memory_encoder.dtype == torch.float32


def test_generates_like_the_pipeline_built_in_memory(weights):
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


def test_real_preset_without_weights_names_the_settings(weights):
    wan_path, _ = weights
    with pytest.raises(WeightsNotFound, match="DITMEM_WAN_PATH"):
        load_pipeline("wan2.1-t2v-1.3b", device="cpu")
    # A Wan2.1 folder has no memory encoder of its own.
    with pytest.raises(WeightsNotFound, match="DITMEM_DIT_MEM_PATH"):
        load_pipeline("wan2.1-t2v-1.3b", wan_path=wan_path, device="cpu")


def test_missing_dit_mem_checkpoint_is_named(weights, tmp_path):
    wan_path, _ = weights
    with pytest.raises(WeightsNotFound, match="DiT-Mem-1.3B.safetensors"):
        load_pipeline(
            "wan2.1-t2v-1.3b", wan_path=wan_path, dit_mem_path=tmp_path / "nope", device="cpu"
        )
