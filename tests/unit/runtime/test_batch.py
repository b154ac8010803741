"""Prompt files and output plans: the reference's names and seeds for PhyGenBench and VBench."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.batch import PromptFileError, plan, read_prompts


def test_phygenbench_is_one_seed_42_video_output_n_per_prompt(tmp_path: Path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([
        {"caption": "A ball falls onto the floor", "physical_laws": "gravity", "sub_category": "m"},
        {"caption": "Ice melts in the sun", "physical_laws": "melting"},
    ]))  # fmt: skip
    items = read_prompts(prompts)
    assert [i.prompt for i in items] == ["A ball falls onto the floor", "Ice melts in the sun"]
    assert items[0].extra == {"physical_laws": "gravity", "sub_category": "m"}
    planned = plan(items, "phygenbench")
    assert [(v.output, v.seed) for v in planned] == [
        ("video_output_1.mp4", 42), ("video_output_2.mp4", 42)
    ]  # fmt: skip


def test_vbench_is_five_samples_seeded_per_category_position(tmp_path: Path):
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "subject_consistency.txt").write_text("a dog running\na cat/kitten\\playing\n")
    (folder / "overall_consistency.txt").write_text("\na car\n")
    planned = plan(read_prompts(folder), "vbench")
    by_output = {v.output: v.seed for v in planned}
    assert len(planned) == 15
    assert by_output["subject_consistency/a dog running-0.mp4"] == 42 + 10 * 1 + 0
    assert by_output["subject_consistency/a dog running-4.mp4"] == 42 + 10 * 1 + 4
    assert by_output["subject_consistency/a cat_kitten_playing-2.mp4"] == 42 + 10 * 2 + 2
    assert by_output["overall_consistency/a car-0.mp4"] == 42 + 10 * 1  # its own file's index


def test_plain_uses_the_csvs_names_or_numbers_and_consecutive_seeds(tmp_path: Path):
    named = tmp_path / "inference.csv"
    named.write_text("video_path,caption\nclips/one.mp4,first\ntwo,second\n")
    assert [(v.output, v.seed) for v in plan(read_prompts(named), "plain", seed=7)] == [
        ("clips/one.mp4", 7), ("two.mp4", 8)
    ]  # fmt: skip
    text = tmp_path / "prompts.txt"
    text.write_text("a\n\nb\n")
    planned = plan(read_prompts(text), "plain", samples=2)
    assert [(v.output, v.seed, v.sample) for v in planned] == [
        ("00001-0.mp4", 0, 0), ("00001-1.mp4", 1, 1), ("00002-0.mp4", 2, 0), ("00002-1.mp4", 3, 1)
    ]  # fmt: skip
    lines = tmp_path / "prompts.jsonl"
    lines.write_text('{"prompt": "x", "id": 3}\n\n{"text": "y"}\n')
    assert [(i.prompt, i.line, i.extra) for i in read_prompts(lines)] == [
        ("x", 1, {"id": 3}), ("y", 3, {})
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"prompt": "ok"}\n{oops\n', "bad.jsonl line 2: not JSON"),
        ("bad.csv", "caption\nfine\n   \n", "bad.csv line 3: no prompt"),
        ("nocol.csv", "title\nx\n", "nocol.csv line 2: no caption / prompt / text field"),
        ("bad.json", '[{"caption": "a"}, {"other": 1}]', "bad.json item 2: no caption"),
        ("escape.csv", "video,caption\n../../etc/x.mp4,a\n", "leaves the output folder"),
        ("empty.txt", "\n\n", "empty.txt: no prompts"),
        ("prompts.yaml", "- a", "not a .txt, .csv, .json or .jsonl"),
    ],
)
def test_a_bad_prompt_file_is_an_error_naming_the_line(tmp_path: Path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PromptFileError, match=message.replace("(", r"\(").replace(".", r"\.")):
        plan(read_prompts(path), "plain")
