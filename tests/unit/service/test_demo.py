"""The README's main command: the embedded API end to end, over real HTTP on a local port."""

from __future__ import annotations

from model.video_io import read_video
from service.demo import run_demo
from tests.embedded import embedded_settings


def test_demo_uploads_generates_with_memory_and_downloads(tmp_path):
    settings = embedded_settings(tmp_path)
    lines: list[str] = []
    out = run_demo(settings, "a red ball rolling right", tmp_path / "demo.mp4", report=lines.append)

    assert read_video(out).shape == (9, 64, 64, 3)
    assert any(line.startswith("memory clip 1 ") for line in lines), lines
    assert lines[-2] == "generate succeeded step 2/2"
