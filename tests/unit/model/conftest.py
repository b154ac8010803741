"""Fixtures of the model tests: the tiny pipeline (seeded random components, CPU) and the
per-clip memory tokens of two random 9-frame 64x64 clips, built once per test module."""

from __future__ import annotations

import pytest
import torch

from model.pipeline import MemoryWanPipeline
from model.tiny import build_tiny_components
from model.tokens import ClipTokens


@pytest.fixture(scope="module")
def pipe() -> MemoryWanPipeline:
    pipeline = MemoryWanPipeline(**build_tiny_components(0))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def clip_tokens(pipe: MemoryWanPipeline) -> ClipTokens:
    videos = torch.rand(2, 3, 9, 64, 64, generator=torch.Generator().manual_seed(7))
    return pipe.resample_clips(videos * 2 - 1)
