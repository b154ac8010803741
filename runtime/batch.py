"""Batch generation: prompt files in, one video per prompt and seed out, in the layouts that the
PhyGenBench and VBench evaluators read (the reference implementation's own naming and seeds).

This module reads prompt files and plans the outputs (pure: names, seeds, what is done
already); ``ditmem batch`` runs the plan.

Layouts (``../shared/fixtures/sampler_golden.json``, ``reference_defaults``):

* ``phygenbench``: ``video_output_{n}.mp4``, ``n`` the 1-based prompt index, one seed (42) for
  every prompt;
* ``vbench``: ``<category>/<prompt, "/" and "\\" as "_">-<i>.mp4``, 5 samples per prompt,
  seed ``42 + 10 * p + i`` with ``p`` the 1-based index of the prompt in its category file;
* ``plain``: the CSV's ``video``/``video_path`` names, else ``{n:05d}.mp4``; seeds ``S, S+1, ...``
  over the outputs in order.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from model.profiles import REFERENCE_SEED

Layout = Literal["plain", "phygenbench", "vbench"]
PROMPT_COLUMNS = ("caption", "prompt", "text")
NAME_COLUMNS = ("video", "video_path")
VBENCH_SAMPLES = 5


class PromptFileError(ValueError):
    """A prompt file that cannot be read; the message names the file and the line."""


@dataclass(frozen=True)
class BatchPrompt:
    prompt: str
    line: int  # where it is in its file (JSON: the 1-based item number)
    category: str | None = None  # VBench: the stem of its prompt file
    name: str | None = None  # an output name the file gives (the reference's inference CSV)
    extra: dict[str, Any] = field(default_factory=dict)  # other fields, kept in batch.jsonl


@dataclass(frozen=True)
class PlannedVideo:
    output: str  # path relative to the output folder
    prompt: BatchPrompt
    seed: int
    sample: int  # 0-based sample of its prompt


def _prompt_text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PromptFileError(f"{where}: no prompt")
    return value.strip()


def _from_mapping(row: dict[str, Any], line: int, where: str, category: str | None) -> BatchPrompt:
    for column in PROMPT_COLUMNS:
        if column in row and row[column] is not None:
            prompt = _prompt_text(row[column], where)
            break
    else:
        raise PromptFileError(f"{where}: no {' / '.join(PROMPT_COLUMNS)} field")
    name = next((str(row[c]) for c in NAME_COLUMNS if row.get(c)), None)
    extra = {k: v for k, v in row.items() if k not in PROMPT_COLUMNS and k not in NAME_COLUMNS}
    return BatchPrompt(prompt, line, category, name, extra)


def _text_file(path: Path, category: str | None) -> Iterator[BatchPrompt]:
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if text.strip():
            yield BatchPrompt(text.strip(), number, category)


def read_prompts(source: str | Path) -> list[BatchPrompt]:
    """Prompts of a ``.txt`` (one a line), ``.csv`` (a caption/prompt column), ``.json`` (a list
    of objects with a ``caption``, PhyGenBench's ``prompts.json``), ``.jsonl``, or a folder of
    ``.txt`` files (VBench: each file's stem is the category)."""
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise PromptFileError(f"{path}: no .txt prompt files in this folder")
        return [item for file in files for item in _text_file(file, file.stem)]
    if not path.is_file():
        raise PromptFileError(f"{path}: no such prompt file")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        prompts = list(_text_file(path, None))
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as handle:
            prompts = [
                _from_mapping(row, number, f"{path.name} line {number}", None)
                for number, row in enumerate(csv.DictReader(handle), start=2)
            ]
    elif suffix in (".jsonl", ".ndjson"):
        prompts = []
        for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not text.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise PromptFileError(f"{where}: not JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise PromptFileError(f"{where}: not an object")
            prompts.append(_from_mapping(row, number, where, None))
    elif suffix == ".json":
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise PromptFileError(
                f"{path.name} line {error.lineno}: not JSON ({error.msg})"
            ) from None
        if not isinstance(items, list):
            raise PromptFileError(f"{path.name}: not a list of prompts")
        prompts = [
            _from_mapping(item, number, f"{path.name} item {number}", None)
            if isinstance(item, dict)
            else BatchPrompt(_prompt_text(item, f"{path.name} item {number}"), number)
            for number, item in enumerate(items, start=1)
        ]
    else:
        raise PromptFileError(f"{path.name}: not a .txt, .csv, .json or .jsonl prompt file")
    if not prompts:
        raise PromptFileError(f"{path.name}: no prompts")
    return prompts


def vbench_name(prompt: str) -> str:
    return prompt.replace("/", "_").replace("\\", "_")


def _inside(name: str, item: BatchPrompt) -> str:
    relative = PurePosixPath(name.replace("\\", "/"))
    if relative.is_absolute() or ".." in relative.parts:
        raise PromptFileError(f"line {item.line}: output {name!r} leaves the output folder")
    return str(relative.with_suffix(".mp4"))


def plan(
    prompts: list[BatchPrompt],
    layout: Layout,
    *,
    samples: int | None = None,
    seed: int | None = None,
) -> list[PlannedVideo]:
    """Every video to make, in order, with its output path and seed."""
    planned: list[PlannedVideo] = []
    if layout == "phygenbench":
        base = REFERENCE_SEED if seed is None else seed
        count = samples or 1
        for n, item in enumerate(prompts, start=1):
            for i in range(count):
                name = f"video_output_{n}.mp4" if count == 1 else f"video_output_{n}-{i}.mp4"
                planned.append(PlannedVideo(name, item, base, i))
        return planned
    if layout == "vbench":
        base = REFERENCE_SEED if seed is None else seed
        count = samples or VBENCH_SAMPLES
        position: dict[str | None, int] = {}
        for item in prompts:
            p = position[item.category] = position.get(item.category, 0) + 1
            folder = f"{item.category}/" if item.category else ""
            for i in range(count):
                planned.append(
                    PlannedVideo(
                        f"{folder}{vbench_name(item.prompt)}-{i}.mp4", item, base + 10 * p + i, i
                    )
                )
        return planned
    count, next_seed = samples or 1, 0 if seed is None else seed
    for n, item in enumerate(prompts, start=1):
        stem = _inside(item.name, item)[: -len(".mp4")] if item.name else f"{n:05d}"
        for i in range(count):
            name = f"{stem}.mp4" if count == 1 else f"{stem}-{i}.mp4"
            planned.append(PlannedVideo(name, item, next_seed, i))
            next_seed += 1
    return planned
