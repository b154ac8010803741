"""``ditmem memory`` and ``ditmem index`` commands against a real bank directory."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ditmem.cli import app
from tests.media import moving_square, write_clip


@pytest.fixture
def runner(monkeypatch, tmp_path) -> CliRunner:
    monkeypatch.setenv("DITMEM_BANK_DIR", str(tmp_path / "bank"))
    monkeypatch.setenv("DITMEM_PRESET", "tiny")  # not the default toy: fast plumbing
    return CliRunner()


@pytest.fixture
def videos(tmp_path):
    folder = tmp_path / "videos"
    write_clip(folder / "red.mp4", moving_square("red", 1))
    write_clip(folder / "blue.mp4", moving_square("blue", -1))
    return folder


def invoke(runner, *args):
    result = runner.invoke(app, list(args))
    return result


def test_add_search_list_remove_and_rebuild(runner, videos, tmp_path):
    added = invoke(
        runner, "memory", "add", str(videos / "red.mp4"), "--caption", "a red ball", "--tag", "demo"
    )
    assert added.exit_code == 0, added.output
    red_id = int(added.stdout.split("\t")[0])
    again = invoke(runner, "memory", "add", str(videos / "red.mp4"), "--caption", "dup")
    assert again.exit_code == 0 and "already in the bank" in again.stdout
    assert int(again.stdout.split("\t")[0]) == red_id
    assert (
        invoke(runner, "memory", "add", str(videos / "blue.mp4"), "--caption", "a cat").exit_code
        == 0
    )

    search = invoke(runner, "memory", "search", "red ball", "-k", "2")
    assert search.exit_code == 0
    assert search.stdout.splitlines()[0].startswith(f"{red_id}\t")
    listed = invoke(runner, "memory", "list", "--tag", "demo")
    assert listed.stdout.strip().splitlines() == [listed.stdout.strip().splitlines()[0]]
    assert "a red ball" in listed.stdout

    assert invoke(runner, "index", "rebuild").stdout.strip() == "caption index rebuilt: 2 clips"
    removed = invoke(runner, "memory", "rm", str(red_id))
    assert removed.exit_code == 0 and "deleted" in removed.stdout
    assert str(red_id) not in [
        line.split("\t")[0]
        for line in invoke(runner, "memory", "search", "red ball").stdout.splitlines()
    ]


def test_list_pages_and_rebuild_builds_the_index_once(runner, videos, tmp_path, monkeypatch):
    from memory_bank.index import VectorIndex

    for name in ("red", "blue"):
        invoke(runner, "memory", "add", str(videos / f"{name}.mp4"), "--caption", f"a {name} ball")
    first = invoke(runner, "memory", "list", "--limit", "1")
    newest = first.stdout.split("\t")[0]
    assert "1 of 2 clips; next page: --before " + newest in first.output
    second = invoke(runner, "memory", "list", "--limit", "1", "--before", newest)
    assert "a red ball" in second.stdout and "next page" not in second.output

    builds = []
    build = VectorIndex.build.__func__
    monkeypatch.setattr(
        VectorIndex,
        "build",
        classmethod(lambda cls, *a, **k: builds.append(1) or build(cls, *a, **k)),
    )
    assert invoke(runner, "index", "rebuild").stdout.strip() == "caption index rebuilt: 2 clips"
    assert len(builds) == 1  # not a snapshot load (or a build) and then a second build
    assert (tmp_path / "bank" / "index" / "text.json").exists()


def test_generate_retrieves_from_the_bank(runner, videos, tmp_path):
    invoke(runner, "memory", "add", str(videos / "red.mp4"), "--caption", "a red ball")
    out = tmp_path / "gen.mp4"
    result = invoke(
        runner, "generate", "--prompt", "a red ball", "--retrieve", "1", "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    import json

    record = json.loads(out.with_suffix(".json").read_text())
    assert record["num_memory_clips"] == 1
    assert record["memory"][0]["caption"] == "a red ball"


def test_import_folder(runner, videos, tmp_path):
    captions = tmp_path / "captions.csv"
    captions.write_text(
        "video,caption\nred.mp4,a red ball\nblue.mp4,a blue ball\nnope.mp4,missing\n"
    )
    result = invoke(runner, "memory", "import", str(videos), "--captions", str(captions))
    assert result.exit_code == 0, result.output
    assert "imported 2, already in the bank 0, rejected 1" in result.stdout
    assert "rejected line 4 (nope.mp4)" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["memory", "rm", "999"], "no clip with id 999"),
        (["memory", "add", "missing.mp4", "--caption", "x"], "file not found"),
        (["memory", "search", "  "], "must not be empty"),
        (["memory", "import", ".", "--captions", "nope.csv"], "not found"),
        (
            ["train", "--run-dir", "run", "--t-min", "0.8", "--t-max", "0.2"],
            "t_min 0.8 > t_max 0.2",
        ),
    ],
)
def test_bad_input_is_a_one_line_error(runner, args, message):
    result = invoke(runner, *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_encoder_calibrate_then_serve_the_calibrated_encoder(runner, videos, tmp_path, monkeypatch):
    for name in ("red", "blue"):
        added = invoke(runner, "memory", "add", str(videos / f"{name}.mp4"), "--caption", name)
        assert added.exit_code == 0, added.output
    out = tmp_path / "calibrated"
    result = invoke(runner, "encoder", "calibrate", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "calibrated on 2 clip latents" in result.stdout
    assert "high_pass_module.conv_block1.fft_filter.norm" in result.stdout

    from model.loading import load_memory_encoder
    from model.tiny import build_tiny_components

    calibrated = load_memory_encoder(out)
    default = build_tiny_components()["memory_encoder"]
    norm = calibrated.high_pass_module.conv_block1.fft_filter.norm
    assert int(norm.num_batches_tracked) == 2
    assert calibrated.fingerprint() != default.fingerprint()

    # Served through DITMEM_DIT_MEM_PATH, the bank's tokens are recomputed for it.
    monkeypatch.setenv("DITMEM_DIT_MEM_PATH", str(out))
    retoken = invoke(runner, "memory", "retoken")
    assert retoken.exit_code == 0, retoken.output
    assert "recomputed 2 clips" in retoken.stdout
