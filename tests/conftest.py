"""Shared test fixtures: the golden reference tensors and how to read them.

The golden tensors were produced by the official DiT-Mem implementation. A trimmed copy ships in
``tests/golden`` (random inputs are regenerated from their recorded seeds); ``DITMEM_FIXTURES``
points the tests at a full fixture set instead. A missing fixture is an error, never a skip:
parity tests that silently do not run would prove nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from model.encoder import MemoryEncoder
from tests.golden.regenerate import HERE as VENDORED_GOLDEN
from tests.golden.regenerate import load_encoder_golden, load_injection_golden

FIXTURES_ENV = "DITMEM_FIXTURES"


def fixtures_path() -> Path:
    """``$DITMEM_FIXTURES`` when set, else the trimmed copy in ``tests/golden``."""
    configured = os.environ.get(FIXTURES_ENV)
    return Path(configured) if configured else VENDORED_GOLDEN


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    path = fixtures_path()
    if not path.is_dir():
        pytest.fail(
            f"golden fixtures directory {path} does not exist; set {FIXTURES_ENV} to the folder "
            "holding encoder_golden_small.*, injection_golden_tiny.* and "
            "dit_mem_official_keys.json",
            pytrace=False,
        )
    return path


def _require(path: Path) -> Path:
    if not path.is_file():
        pytest.fail(
            f"golden fixture {path.name} is missing from {path.parent} ({FIXTURES_ENV})",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def encoder_golden(fixtures_dir: Path) -> dict[str, torch.Tensor]:
    """Tensors of ``encoder_golden_small`` (weights, inputs, outputs); clone before editing."""
    _require(fixtures_dir / "encoder_golden_small.safetensors")
    return load_encoder_golden(fixtures_dir)


@pytest.fixture(scope="session")
def encoder_golden_meta(fixtures_dir: Path) -> dict:
    return json.loads(_require(fixtures_dir / "encoder_golden_small.json").read_text())


@pytest.fixture(scope="session")
def injection_golden(fixtures_dir: Path) -> dict[str, torch.Tensor]:
    """Tensors of ``injection_golden_tiny`` (DiT weights, inputs, outputs)."""
    _require(fixtures_dir / "injection_golden_tiny.safetensors")
    return load_injection_golden(fixtures_dir)


@pytest.fixture(scope="session")
def injection_golden_meta(fixtures_dir: Path) -> dict:
    return json.loads(_require(fixtures_dir / "injection_golden_tiny.json").read_text())


@pytest.fixture(scope="session")
def official_keys(fixtures_dir: Path) -> dict:
    """``dit_mem_official_keys.json``: the official-size encoder's keys, shapes and counts."""
    return json.loads(_require(fixtures_dir / "dit_mem_official_keys.json").read_text())


# -- the reduced-width reference encoder of encoder_golden_small -----------------------------------

# The golden file holds two models (see encoder_golden_small.json): the main one and "t3", whose
# latent grid keeps three temporal steps after the CNN so that a clip's tokens differ.
GOLDEN_ENCODER_PREFIXES = {"main": "weights.", "t3": "t3.weights."}
GOLDEN_LATENT_SHAPES = {"main": (13, 33, 49), "t3": (45, 13, 13)}
# The fixture's only edit to the reference: conv widths 512 -> 32 and 768 -> 48.
GOLDEN_CONV_CHANNELS = (32, 48)


@pytest.fixture(scope="session")
def golden_encoder_config(encoder_golden_meta: dict):
    """``variant -> MemoryEncoder kwargs`` of the two fixture models."""
    ctor = encoder_golden_meta["constructor"]
    assert tuple(ctor["latent_shape"]) == GOLDEN_LATENT_SHAPES["main"]

    def config(variant: str = "main") -> dict:
        return dict(
            in_channels=ctor["in_channels"],
            num_tokens=ctor["target_seq_len"],
            token_dim=ctor["target_feat_dim"],
            latent_shape=GOLDEN_LATENT_SHAPES[variant],
            conv_channels=GOLDEN_CONV_CHANNELS,
            num_heads=ctor["self_attention_num_heads"],
            fft_dropout=ctor["fft_dropout"],
        )

    return config


@pytest.fixture(scope="session")
def golden_encoder_state(encoder_golden: dict[str, torch.Tensor]):
    """``variant -> state dict`` (parameters and buffers, no ``cnn.*`` aliases), cloned."""

    def state(variant: str = "main") -> dict[str, torch.Tensor]:
        prefix = GOLDEN_ENCODER_PREFIXES[variant]
        return {
            key[len(prefix) :]: value.clone()
            for key, value in encoder_golden.items()
            if key.startswith(prefix)
        }

    return state


@pytest.fixture(scope="session")
def make_golden_encoder(golden_encoder_config, golden_encoder_state):
    """``variant -> MemoryEncoder`` with the fixture weights, in eval mode; new per call."""

    def make(variant: str = "main") -> MemoryEncoder:
        encoder = MemoryEncoder(**golden_encoder_config(variant))
        encoder.load_state_dict(golden_encoder_state(variant), strict=True)
        return encoder.eval()

    return make
