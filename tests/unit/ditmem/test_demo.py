"""The README's main command: the toy world through the embedded API, over real HTTP."""

from __future__ import annotations

from PIL import Image

from ditmem.demo import QUERY, run_demo
from model.presets import TOY
from model.video_io import read_video
from tests.embedded import embedded_settings


def test_demo_retrieves_falling_clips_and_generates_with_and_without_them(tmp_path):
    settings = embedded_settings(tmp_path, preset="toy")
    lines: list[str] = []
    result = run_demo(settings, tmp_path / "out", report=lines.append, per_combo=1, samples=2)

    size = 16 * TOY.display_scale
    assert len(result.with_memory) == len(result.without_memory) == 2
    for video in result.with_memory + result.without_memory:
        assert read_video(video).shape == (TOY.num_frames, size, size, 3)
    # Retrieval for "a ball falling" found falling balls, whatever their colour.
    assert len(result.memory_captions) == 3
    assert all(caption.endswith("falling") for caption in result.memory_captions), lines
    assert QUERY == "a ball falling"
    # One strip row per memory clip and per generated video.
    strip = Image.open(result.strip)
    assert strip.height >= 7 * 16 * 6
    assert any(line.startswith("memory clip ") for line in lines)
    assert lines[-2].startswith("with memory: ") and lines[-1].startswith("without: ")
    # Each pair shares prompt and seed, so it differs only through the memory.
    assert (read_video(result.with_memory[0]) != read_video(result.without_memory[0])).any()
