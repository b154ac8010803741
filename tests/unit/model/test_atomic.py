"""model.atomic on a real filesystem: replaced on success, left as it was on failure."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from model import atomic
from model.atomic import FILE_MODE, atomic_path, atomic_write_bytes, atomic_write_text


class Boom(RuntimeError):
    pass


@pytest.fixture
def strict_umask() -> Iterator[None]:
    """umask 077: a plain write would give 0600, so 0644 can only come from atomic_path."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path below ``root`` (relative), with the bytes of files and None for folders."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def test_successful_write_replaces_the_file(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")

    with atomic_path(target) as tmp:
        assert not tmp.exists()
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".") and tmp.suffix == ".bin"
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # nothing is published before the block ends

    assert _tree(tmp_path) == {"data.bin": b"new"}


def test_write_creates_missing_parent_folders(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "data.txt"
    assert atomic_write_text(target, "hello") == target
    assert target.read_text() == "hello"


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")

    with pytest.raises(Boom), atomic_path(target, durable=True) as tmp:
        tmp.write_bytes(b"half written")
        raise Boom

    assert _tree(tmp_path) == {"data.bin": b"old"}


def test_failed_write_of_a_new_target_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(Boom), atomic_path(tmp_path / "fresh.txt") as tmp:
        tmp.write_text("partial")
        raise Boom
    assert _tree(tmp_path) == {}


def test_a_body_that_writes_nothing_is_an_error(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    with pytest.raises(FileNotFoundError, match="nothing was written"), atomic_path(target):
        pass
    assert _tree(tmp_path) == {"data.bin": b"old"}


def test_folder_target_is_replaced_whole(tmp_path: Path) -> None:
    target = tmp_path / "step-000100"
    (target / "sub").mkdir(parents=True)
    (target / "stale.pt").write_bytes(b"stale")
    (target / "sub" / "old.txt").write_bytes(b"old")

    with atomic_path(target, durable=True) as tmp:
        tmp.mkdir()
        (tmp / "state.pt").write_bytes(b"fresh")

    assert _tree(tmp_path) == {"step-000100": None, "step-000100/state.pt": b"fresh"}


@pytest.mark.parametrize("failure", ["body raises", "rename fails"])
def test_failed_folder_write_keeps_the_old_folder(
    tmp_path: Path, monkeypatch, failure: str
) -> None:
    target = tmp_path / "step-000100"
    target.mkdir()
    (target / "state.pt").write_bytes(b"old")
    if failure == "rename fails":
        # Only publishing the new folder fails: moving the old one aside (and back) still works.
        real_replace = os.replace

        def replace(src, dst):
            if ".tmp" in Path(src).name:
                raise Boom
            real_replace(src, dst)

        monkeypatch.setattr(atomic.os, "replace", replace)

    with pytest.raises(Boom), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "state.pt").write_bytes(b"new")
        if failure == "body raises":
            raise Boom

    assert _tree(tmp_path) == {"step-000100": None, "step-000100/state.pt": b"old"}


def test_file_can_replace_a_folder(tmp_path: Path) -> None:
    target = tmp_path / "thing"
    target.mkdir()
    (target / "inner").write_bytes(b"x")
    atomic_write_bytes(target, b"now a file")
    assert _tree(tmp_path) == {"thing": b"now a file"}


def test_tmp_dir_holds_the_temporary(tmp_path: Path) -> None:
    scratch, files = tmp_path / "tmp", tmp_path / "files"
    target = files / "ab" / "clip.safetensors"

    with atomic_path(target, tmp_dir=scratch) as tmp:
        assert tmp.parent == scratch and tmp.suffix == ".safetensors"
        tmp.write_bytes(b"tokens")
        assert _tree(files) == {"ab": None}  # nothing beside the target while writing

    assert target.read_bytes() == b"tokens"
    assert _tree(scratch) == {}


def test_failed_write_through_tmp_dir_leaves_nothing_in_it(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    target = tmp_path / "files" / "clip.bin"
    target.parent.mkdir()
    target.write_bytes(b"old")

    with pytest.raises(Boom), atomic_path(target, tmp_dir=scratch) as tmp:
        tmp.write_bytes(b"half")
        raise Boom

    assert target.read_bytes() == b"old"
    assert _tree(scratch) == {}
    assert _tree(target.parent) == {"clip.bin": b"old"}


@pytest.mark.usefixtures("strict_umask")
@pytest.mark.parametrize("durable", [False, True])
def test_files_are_published_0644(tmp_path: Path, durable: bool) -> None:
    target = tmp_path / "video.mp4"
    with atomic_path(target, durable=durable) as tmp:
        tmp.write_bytes(b"frames")
    assert FILE_MODE == 0o644
    assert target.stat().st_mode & 0o777 == 0o644

    text = atomic_write_text(tmp_path / "record.json", "{}")
    assert text.stat().st_mode & 0o777 == 0o644


def test_durable_flushes_before_the_rename_and_after_the_body(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "index.faiss"
    events: list[str] = []
    real_fsync, real_replace = atomic._fsync, os.replace

    def fsync(path: Path) -> None:
        events.append("fsync dir" if Path(path).is_dir() else "fsync file")
        real_fsync(path)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(atomic, "_fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    with atomic_path(target, durable=True) as tmp:
        tmp.write_bytes(b"index")
        events.append("body done")

    assert events == ["body done", "fsync file", "rename", "fsync dir"]
    assert target.read_bytes() == b"index"

    events.clear()
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"again")
    assert events == ["rename"]


def test_atomic_write_text_and_bytes(tmp_path: Path) -> None:
    target = tmp_path / "clip.json"
    target.write_text("old")
    assert atomic_write_text(target, "caf\u00e9\n") == target
    assert target.read_bytes() == "caf\u00e9\n".encode()
    assert atomic_write_bytes(target, b"\x00\x01") == target
    assert _tree(tmp_path) == {"clip.json": b"\x00\x01"}
