"""The ``ditmem`` command line on the tiny preset: real pipeline, real mp4 on disk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ditmem.cli import app
from model.video_io import read_video

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    # The default preset is toy; these plumbing tests ask for the faster tiny one.
    monkeypatch.setenv("DITMEM_PRESET", "tiny")
    for name in ("DITMEM_WAN_PATH", "DITMEM_DIT_MEM_PATH"):
        monkeypatch.delenv(name, raising=False)
    return CliRunner()


def test_generate_writes_a_playable_video_and_its_record(runner: CliRunner, tmp_path: Path):
    out = tmp_path / "nested" / "clip.mp4"
    result = runner.invoke(
        app, ["generate", "--prompt", "a red ball", "--out", str(out), "--seed", "3"]
    )

    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out.resolve())
    frames = read_video(out)
    assert frames.shape == (9, 64, 64, 3)
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["params"]["prompt"] == "a red ball"
    assert record["params"]["seed"] == 3
    assert record["params"]["memory_guidance"] is False  # the tiny preset's default
    assert record["num_memory_clips"] == 0


def test_generate_records_a_memory_guidance_override(runner: CliRunner, tmp_path: Path):
    out = tmp_path / "guided.mp4"
    args = ["generate", "--prompt", "a red ball", "--out", str(out), "--memory-guidance"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(out.with_suffix(".json").read_text())["params"]["memory_guidance"] is True


def test_generate_with_memory_clips_changes_the_video(runner: CliRunner, tmp_path: Path):
    plain, steered = tmp_path / "plain.mp4", tmp_path / "steered.mp4"
    assert (
        runner.invoke(app, ["generate", "--prompt", "a ball", "--out", str(plain)]).exit_code == 0
    )
    result = runner.invoke(
        app,
        [
            "generate",
            "--prompt",
            "a ball",
            "--out",
            str(steered),
            "--memory",
            str(plain),
            "--memory",
            str(plain),
        ],
    )

    assert result.exit_code == 0, result.output
    assert json.loads(steered.with_suffix(".json").read_text())["num_memory_clips"] == 2
    difference = abs(read_video(plain).astype(int) - read_video(steered).astype(int)).max()
    assert difference > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "   "], "prompt must not be empty"),
        (["--prompt", "x", "--steps", "99"], "steps=99 is outside"),
        (["--prompt", "x", "--frames", "10"], "num_frames=10 must be"),
        (["--prompt", "x", "--width", "70"], "width=70 must be a multiple of 16"),
        (["--prompt", "x", "--preset", "nope"], "preset"),
        (["--prompt", "x", "--preset", "wan2.1-t2v-1.3b"], "DITMEM_WAN_PATH"),
        (["--prompt", "x", "--quantize", "fp8"], "fp8 weights need a CUDA GPU"),
        (["--prompt", "x", "--offload", "group", "--quantize", "int8"], "not both"),
        (["--prompt", "x", "--offload", "disk"], "offload"),
        (["--prompt", "x", "--cache", "taylorseer", "--cache-threshold", "0.1"], "no threshold"),
        (["--prompt", "x", "--cache", "mag", "--profile", "reference"], "reference profile"),
    ],
)
def test_bad_input_is_a_one_line_error(runner: CliRunner, tmp_path: Path, args, message):
    out = tmp_path / "never.mp4"
    result = runner.invoke(app, ["generate", *args, "--out", str(out)])

    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_generate_with_a_cache_on_an_offloaded_model(runner: CliRunner, tmp_path: Path):
    out = tmp_path / "offloaded.mp4"
    args = ["generate", "--prompt", "a red ball", "--out", str(out), "--offload", "group",
            "--cache", "taylorseer", "--cache-interval", "2"]  # fmt: skip
    result = runner.invoke(app, args, env={"DITMEM_OFFLOAD_DIR": str(tmp_path / "weights")})
    assert result.exit_code == 0, result.output
    assert read_video(out).shape == (9, 64, 64, 3)
    cache = json.loads(out.with_suffix(".json").read_text())["params"]["cache"]
    assert cache == {"kind": "taylorseer", "threshold": None, "interval": 2}
    assert list((tmp_path / "weights").rglob("*.safetensors"))  # the weights waited in files


def test_memory_that_is_not_a_video_is_rejected(runner: CliRunner, tmp_path: Path):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    result = runner.invoke(
        app, ["generate", "--prompt", "x", "--memory", str(text), "--out", str(tmp_path / "o.mp4")]
    )

    assert result.exit_code == 2
    assert "notes.mp4" in result.output


def test_missing_wan_folder_names_the_missing_part(runner: CliRunner, tmp_path: Path):
    args = ["generate", "--prompt", "x", "--preset", "wan2.1-t2v-1.3b", "--wan-path", str(tmp_path)]
    result = runner.invoke(
        app, [*args, "--dit-mem-path", str(tmp_path / "DiT-Mem-1.3B.safetensors")]
    )

    assert result.exit_code == 2
    assert "model_index.json" in result.output
    assert "huggingface-cli download" in result.output


def test_module_entry_point_runs_as_a_separate_process(tmp_path: Path):
    out = tmp_path / "cli.mp4"
    completed = subprocess.run(
        [sys.executable, "-m", "ditmem", "generate", "--prompt", "a cat", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            "PYTHONPATH": str(REPO_ROOT),
            "PATH": "/usr/bin:/bin",
            "HF_HUB_OFFLINE": "1",
            "DITMEM_PRESET": "tiny",
        },  # fmt: skip
    )
    assert completed.returncode == 0, completed.stderr
    assert Path(completed.stdout.strip().splitlines()[-1]) == out.resolve()
    assert read_video(out).shape[0] == 9
