"""Atomic replacement of files and folders: build a temporary, then rename it over the target.

A reader of the target sees either what was there before or the complete new version, never a
partial write: the new content is built under a unique hidden name on the same filesystem and
published with :func:`os.replace`. If building it raises, the temporary is removed and the
target is left as it was.

    with atomic_path(run_dir / "weights.safetensors") as tmp:
        save_file(tensors, tmp)

    with atomic_path(run_dir / "checkpoints" / "step-000100") as tmp:  # a folder
        tmp.mkdir()
        torch.save(state, tmp / "state.pt")

This module is the bottom of the stack: it imports nothing from the project.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["FILE_MODE", "atomic_path", "atomic_write_bytes", "atomic_write_text"]

PathLike = str | os.PathLike[str]

#: Permissions of every file :func:`atomic_path` publishes (folders keep the ones they were made
#: with).
FILE_MODE = 0o644


@contextlib.contextmanager
def atomic_path(
    target: PathLike, *, tmp_dir: PathLike | None = None, durable: bool = False
) -> Iterator[Path]:
    """Yield a fresh temporary path; on a clean exit, rename what was written there to ``target``.

    The yielded path does not exist yet: create a file there (any writer that takes a path) or a
    folder (``tmp.mkdir()``, then fill it). Its name is hidden, unique, and ends in ``target``'s
    suffix, so writers that pick a format from the suffix still work. Parent folders of
    ``target`` (and ``tmp_dir``) are created as needed.

    On a clean exit a file gets :data:`FILE_MODE` permissions and replaces ``target``; a folder
    replaces ``target`` too, even an existing non-empty folder (moved aside, then deleted once the
    new one is in place). On any exception the temporary is deleted and ``target`` is untouched.

    Args:
        target: The file or folder to create or replace.
        tmp_dir: Folder to build the temporary in instead of next to ``target``, so that an
            interrupted write leaves its debris only there. Must be on ``target``'s filesystem.
        durable: Flush the new content to disk before the rename (every file of a folder), and
            the target's parent folder after it, so the new version survives a power loss. The
            flush runs after the ``with`` body, outside any lock the body held.

    Raises:
        FileNotFoundError: The body exited cleanly without creating anything at the path.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = target.parent if tmp_dir is None else Path(tmp_dir)
    folder.mkdir(parents=True, exist_ok=True)
    temporary = _unique_sibling(folder, target, "tmp")
    try:
        yield temporary
        if not os.path.lexists(temporary):
            raise FileNotFoundError(f"nothing was written to {temporary} for {target}")
        is_folder = temporary.is_dir() and not temporary.is_symlink()
        if not is_folder:
            temporary.chmod(FILE_MODE)
        if durable and is_folder:
            _fsync_tree(temporary)
        elif durable:
            _fsync(temporary)
        _publish(temporary, target, folder)
    except BaseException:
        _delete(temporary)
        raise
    if durable:
        # Make the rename itself durable; some filesystems cannot fsync a folder.
        with contextlib.suppress(OSError):
            _fsync(target.parent)


def atomic_write_bytes(
    path: PathLike, data: bytes, *, tmp_dir: PathLike | None = None, durable: bool = False
) -> Path:
    """Replace ``path`` with ``data`` atomically (see :func:`atomic_path`); returns ``path``."""
    path = Path(path)
    with atomic_path(path, tmp_dir=tmp_dir, durable=durable) as tmp:
        tmp.write_bytes(data)
    return path


def atomic_write_text(
    path: PathLike,
    text: str,
    *,
    encoding: str = "utf-8",
    tmp_dir: PathLike | None = None,
    durable: bool = False,
) -> Path:
    """Replace ``path`` with ``text`` atomically (see :func:`atomic_path`); returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding), tmp_dir=tmp_dir, durable=durable)


def _unique_sibling(folder: Path, target: Path, tag: str) -> Path:
    """``folder/.<stem>.<random>.<tag><suffix>``: hidden, unique, keeps ``target``'s suffix."""
    return folder / f".{target.stem}.{uuid.uuid4().hex[:16]}.{tag}{target.suffix}"


def _publish(temporary: Path, target: Path, folder: Path) -> None:
    """Rename ``temporary`` over ``target``, moving a folder (or anything a folder would replace)
    aside first, since :func:`os.replace` cannot overwrite a non-empty folder."""
    folder_involved = temporary.is_dir() or (target.is_dir() and not target.is_symlink())
    if not (folder_involved and os.path.lexists(target)):
        os.replace(temporary, target)
        return
    aside = _unique_sibling(folder, target, "old")
    os.replace(target, aside)
    try:
        os.replace(temporary, target)
    except BaseException:
        os.replace(aside, target)
        raise
    _delete(aside)


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder below ``root``, deepest first, then ``root`` itself."""
    for base, _folders, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(Path(base, name))
        with contextlib.suppress(OSError):
            _fsync(Path(base))
