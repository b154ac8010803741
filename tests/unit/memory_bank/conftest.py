"""Fixtures for memory bank tests: the real offline embedder, the tiny pipeline, real clips."""

from __future__ import annotations

from pathlib import Path

import pytest

from memory_bank.bank import BankOptions, MemoryBank
from memory_bank.embed import TextEmbedder, open_text_embedder
from memory_bank.index import IndexConfig
from memory_bank.ingest import ClipIngestor, IngestLimits
from model.pipeline import MemoryWanPipeline
from model.presets import TINY
from model.tiny import build_tiny_components
from tests.media import moving_square, write_clip


@pytest.fixture(scope="session")
def embedder() -> TextEmbedder:
    return open_text_embedder()


@pytest.fixture(scope="session")
def tiny_pipe() -> MemoryWanPipeline:
    pipe = MemoryWanPipeline(**build_tiny_components(0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real encoded videos: coloured squares moving left or right, in several containers."""
    folder = tmp_path_factory.mktemp("clips")
    return {
        "red_right": write_clip(folder / "red_right.mp4", moving_square("red", 1)),
        "blue_left": write_clip(folder / "blue_left.mp4", moving_square("blue", -1)),
        "green_right": write_clip(folder / "green_right.mkv", moving_square("green", 1)),
        "yellow_left": write_clip(
            folder / "yellow_left.webm", moving_square("yellow", -1), codec="libvpx-vp9"
        ),
    }


@pytest.fixture
def bank_options() -> BankOptions:
    return BankOptions(index=IndexConfig(exact_max=1000))


@pytest.fixture
def bank(tmp_path: Path, embedder, bank_options) -> MemoryBank:
    opened = MemoryBank(tmp_path / "bank", embedder, bank_options)
    yield opened
    opened.close()


@pytest.fixture
def ingestor(bank: MemoryBank, tiny_pipe) -> ClipIngestor:
    return ClipIngestor(bank, tiny_pipe, TINY, IngestLimits(max_bytes=5 * 2**20))
