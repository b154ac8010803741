"""The trimmed golden copy in tests/golden equals the full fixture set it was cut from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.golden.regenerate import HERE, JSON_FILES, load_encoder_golden, load_injection_golden


def _full_fixture_set() -> Path | None:
    for ancestor in HERE.parents:
        candidate = ancestor / "shared" / "fixtures"
        if (candidate / "encoder_golden_small.safetensors").is_file():
            return candidate
    return None


FULL = _full_fixture_set()
pytestmark = pytest.mark.skipif(
    FULL is None, reason="provenance check: no full fixture set beside this checkout"
)


@pytest.mark.parametrize(
    ("name", "load"),
    [
        ("encoder_golden_small.safetensors", load_encoder_golden),
        ("injection_golden_tiny.safetensors", load_injection_golden),
    ],
)
def test_trimmed_copy_plus_regenerated_inputs_equals_the_full_set(name, load):
    full = load_file(FULL / name)
    trimmed = load(HERE)
    for key, value in trimmed.items():
        assert torch.equal(value, full[key]), key
    dropped = set(full) - set(trimmed)
    assert all(key.startswith("ref.") for key in dropped), sorted(dropped)[:5]


@pytest.mark.parametrize("name", JSON_FILES)
def test_descriptions_are_identical(name):
    assert (HERE / name).read_bytes() == (FULL / name).read_bytes()
