"""``ditmem batch`` on the tiny preset: real videos in the requested layout, a record per video,
resumption that skips what decodes and remakes what does not, and a failing exit when a video
fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ditmem.cli import app
from model.video_io import read_video

FAST = ["--steps", "2", "--frames", "5", "--height", "32", "--width", "32"]


@pytest.fixture
def runner(monkeypatch, tmp_path) -> CliRunner:
    monkeypatch.setenv("DITMEM_BANK_DIR", str(tmp_path / "bank"))
    monkeypatch.setenv("DITMEM_PRESET", "tiny")
    return CliRunner()


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "batch.jsonl").read_text().splitlines()]


def test_a_vbench_batch_writes_the_layout_and_resumes(runner, tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "motion.txt").write_text("a red ball\na ball / rolling\n")
    out = tmp_path / "videos"
    args = ["batch", str(prompts), "--out", str(out), "--layout", "vbench", "--samples", "2", *FAST]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "4 made, 0 already there, 0 failed (4 planned)" in first.stdout
    made = sorted(str(p.relative_to(out)) for p in out.rglob("*.mp4"))
    assert made == ["motion/a ball _ rolling-0.mp4", "motion/a ball _ rolling-1.mp4",
                    "motion/a red ball-0.mp4", "motion/a red ball-1.mp4"]  # fmt: skip
    assert read_video(out / made[0]).shape[0] == 5
    lines = records(out)
    assert [(r["output"], r["seed"]) for r in lines] == [
        ("motion/a red ball-0.mp4", 52), ("motion/a red ball-1.mp4", 53),
        ("motion/a ball _ rolling-0.mp4", 62), ("motion/a ball _ rolling-1.mp4", 63),
    ]  # fmt: skip
    assert lines[0]["params"]["steps"] == 2 and lines[0]["status"] == "succeeded"
    assert lines[0]["category"] == "motion" and lines[0]["memory"] == []
    # Same seed, same video: a different seed makes a different one.
    assert (out / made[2]).read_bytes() != (out / made[3]).read_bytes()

    (out / made[1]).write_bytes(b"truncated")  # a partial or broken output is made again
    again = runner.invoke(app, args)
    assert "1 made, 3 already there, 0 failed (4 planned)" in again.stdout, again.output
    assert read_video(out / made[1]).shape[0] == 5
    assert not (out / ".partial").exists()
    assert len(records(out)) == 5


def test_phygenbench_layout_with_retrieval_records_the_memory_used(runner, tmp_path):
    from tests.media import moving_square, write_clip

    clip = write_clip(tmp_path / "red.mp4", moving_square("red", 1))
    added = runner.invoke(app, ["memory", "add", str(clip), "--caption", "a red ball falling"])
    assert added.exit_code == 0, added.output
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"caption": "a ball falling", "physical_laws": "gravity"}]))
    out = tmp_path / "phygen"
    result = runner.invoke(app, ["batch", str(prompts), "--out", str(out), "--layout",
                                 "phygenbench", "--retrieve", "1", *FAST])  # fmt: skip
    assert result.exit_code == 0, result.output
    [line] = records(out)
    assert line["output"] == "video_output_1.mp4" and line["seed"] == 42
    assert line["physical_laws"] == "gravity"
    assert [m["caption"] for m in line["memory"]] == ["a red ball falling"]
    assert line["memory"][0]["score"] > 0
    assert read_video(out / "video_output_1.mp4").shape[0] == 5


def test_bad_input_is_an_error_and_a_failed_video_a_failing_exit(runner, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{broken\n')
    result = runner.invoke(app, ["batch", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "bad.jsonl line 2: not JSON" in result.output
    layout = runner.invoke(app, ["batch", str(bad), "--out", str(tmp_path / "o"), "--layout", "x"])
    assert layout.exit_code == 2 and "unknown layout" in layout.output

    prompts = tmp_path / "one.txt"
    prompts.write_text("a red ball\n")
    odd = runner.invoke(app, ["batch", str(prompts), "--out", str(tmp_path / "o"),
                              "--frames", "6", "--steps", "1"])  # fmt: skip
    assert odd.exit_code == 1, odd.output  # 6 frames is not 4n+1: that video fails
    assert "0 made, 0 already there, 1 failed" in odd.stdout
    assert "failed 00001.mp4:" in odd.output
    assert records(tmp_path / "o")[0]["status"] == "failed"
