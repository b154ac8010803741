"""Seeded inputs of the golden fixtures, and the script that trims the full fixture set.

The golden tensors were produced by the official DiT-Mem implementation (see README.md here).
Their random *inputs* were drawn from seeded generators, recorded in the fixtures' JSON, so we
regenerate them instead of storing ~7 MB of noise; the outputs, intermediates and weights are kept.

    python -m tests.golden.regenerate /path/to/full/fixtures   # rewrite the trimmed copies
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
JSON_FILES = (
    "encoder_golden_small.json",
    "injection_golden_tiny.json",
    "dit_mem_official_keys.json",
    "sampler_golden.json",
)


def encoder_inputs() -> dict[str, torch.Tensor]:
    """``input.n3``, ``input.n1`` (generator seed 100, in that order) and ``t3.input.n2`` (200)."""
    generator = torch.Generator().manual_seed(100)
    n3 = torch.randn(1, 3, 16, 13, 33, 49, generator=generator)
    n1 = torch.randn(1, 1, 16, 13, 33, 49, generator=generator)
    t3 = torch.randn(1, 2, 16, 45, 13, 13, generator=torch.Generator().manual_seed(200))
    return {"input.n3": n3, "input.n1": n1, "t3.input.n2": t3}


def injection_inputs() -> dict[str, torch.Tensor]:
    """Latents, text states and memory drawn in that order from generator seed 1; t = 500."""
    generator = torch.Generator().manual_seed(1)
    return {
        "input.latents": torch.randn(1, 16, 3, 8, 8, generator=generator),
        "input.context": torch.randn(1, 8, 32, generator=generator),
        "input.memory_tokens": torch.randn(1, 12, 96, generator=generator),
        "input.timestep": torch.tensor([500.0]),
    }


def load_encoder_golden(folder: Path = HERE) -> dict[str, torch.Tensor]:
    """The encoder fixture; inputs a full fixture set stores win over regenerated ones."""
    return {**encoder_inputs(), **load_file(folder / "encoder_golden_small.safetensors")}


def load_injection_golden(folder: Path = HERE) -> dict[str, torch.Tensor]:
    """The injection fixture; inputs a full fixture set stores win over regenerated ones."""
    return {**injection_inputs(), **load_file(folder / "injection_golden_tiny.safetensors")}


def trim(full: Path, target: Path = HERE) -> None:
    """Copy the full fixtures to ``target`` without the regenerable inputs and unused weights."""
    encoder = load_file(full / "encoder_golden_small.safetensors")
    injection = load_file(full / "injection_golden_tiny.safetensors")
    for name, value in {**encoder_inputs()}.items():
        assert torch.equal(value, encoder[name]), f"regenerated {name} differs"
    for name, value in injection_inputs().items():
        assert torch.equal(value, injection[name]), f"regenerated {name} differs"
    save_file(
        {k: v for k, v in encoder.items() if k not in encoder_inputs()},
        target / "encoder_golden_small.safetensors",
    )
    # ref.* are the same DiT weights in the original Wan key format; the tests use diffusers.*.
    save_file(
        {k: v for k, v in injection.items() if not k.startswith(("ref.", "input."))},
        target / "injection_golden_tiny.safetensors",
    )
    for name in JSON_FILES:
        shutil.copyfile(full / name, target / name)


if __name__ == "__main__":
    trim(Path(sys.argv[1]))
