"""Object storage: the same behaviour from a local folder and from S3 (real HTTP to moto)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from memory_bank import storage as storage_module
from memory_bank.errors import BankError
from memory_bank.storage import (
    LocalStorage,
    ObjectMissing,
    ObjectStorage,
    S3Storage,
    StorageUnavailable,
    child,
    open_storage,
)
from tests.s3 import MotoServer, moto_server

REPO = Path(__file__).resolve().parents[3]
DATA = bytes(range(256)) * 4 + b"tail"  # 1028 bytes, every byte value, so offsets are visible


@pytest.fixture(scope="module")
def s3_server() -> Iterator[MotoServer]:
    with moto_server() as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStorage:
    """An empty storage of each backend (on S3: a fresh prefix of the shared bucket)."""
    if request.param == "local":
        return open_storage(None, tmp_path / "objects")
    server: MotoServer = request.getfixturevalue("s3_server")
    return open_storage(
        f"s3://{server.bucket}/test-{uuid.uuid4().hex[:8]}",
        tmp_path / "unused",
        endpoint_url=server.endpoint_url,
    )


def files_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


# -- both backends ---------------------------------------------------------------------------------


def test_put_and_get_bytes(storage: ObjectStorage) -> None:
    storage.put_bytes("a/b/c.bin", DATA)
    assert storage.get_bytes("a/b/c.bin") == DATA
    storage.put_bytes("a/b/c.bin", b"replaced")
    assert storage.get_bytes("a/b/c.bin") == b"replaced"
    storage.put_bytes("empty", b"")
    assert storage.get_bytes("empty") == b""
    assert storage.size("empty") == 0


def test_put_file_copies_or_moves(storage: ObjectStorage, tmp_path: Path) -> None:
    source = tmp_path / "source.mp4"
    source.write_bytes(DATA)
    storage.put_file("clips/copied.mp4", source)
    assert source.read_bytes() == DATA
    storage.put_file("clips/moved.mp4", source, move=True)
    assert not source.exists()
    assert storage.get_bytes("clips/copied.mp4") == DATA
    assert storage.get_bytes("clips/moved.mp4") == DATA
    with pytest.raises(FileNotFoundError):
        storage.put_file("clips/none.mp4", tmp_path / "absent.mp4")


def test_download(storage: ObjectStorage, tmp_path: Path) -> None:
    storage.put_bytes("x/y.bin", DATA)
    target = tmp_path / "deep" / "folder" / "y.bin"
    assert storage.download("x/y.bin", target) == target
    assert target.read_bytes() == DATA
    with pytest.raises(ObjectMissing):
        storage.download("x/absent.bin", tmp_path / "absent.bin")
    assert not (tmp_path / "absent.bin").exists()
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == []


def test_local_copy(storage: ObjectStorage) -> None:
    storage.put_bytes("videos/clip.mp4", DATA)
    with storage.local_copy("videos/clip.mp4") as path:
        assert path.read_bytes() == DATA
        assert path.suffix == ".mp4"
    if isinstance(storage, LocalStorage):
        assert path == storage.local_path("videos/clip.mp4")  # the file itself, no copy
        assert path.exists()
    else:
        assert not path.exists() and not path.parent.exists()  # the download is removed
        with pytest.raises(RuntimeError), storage.local_copy("videos/clip.mp4") as path:
            raise RuntimeError("the block fails")
        assert not path.exists() and not path.parent.exists()
    with pytest.raises(ObjectMissing), storage.local_copy("videos/absent.mp4"):
        pass


def test_exists_size_delete(storage: ObjectStorage) -> None:
    assert not storage.exists("k/v")
    storage.put_bytes("k/v", DATA)
    assert storage.exists("k/v")
    assert storage.size("k/v") == len(DATA)
    assert not storage.exists("k")  # a folder-like prefix is not an object
    storage.delete("k/v")
    assert not storage.exists("k/v")
    storage.delete("k/v")  # absent is fine
    storage.delete("never/written")


def test_modified_at(storage: ObjectStorage) -> None:
    before = time.time()
    storage.put_bytes("m", b"1")
    assert before - 5 <= storage.modified_at("m") <= time.time() + 5


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (0, 0),
        (0, len(DATA) - 1),
        (10, 99),
        (255, 256),
        (len(DATA) - 1, len(DATA) - 1),
        (1000, 10**9),
    ],
)
def test_read_range_returns_exact_bytes(storage: ObjectStorage, start: int, end: int) -> None:
    storage.put_bytes("r", DATA)
    assert b"".join(storage.read_range("r", start, end)) == DATA[start : end + 1]


def test_read_range_streams_in_chunks(storage: ObjectStorage) -> None:
    storage.put_bytes("r", DATA)
    pieces = list(storage.read_range("r", 3, 1000, chunk=64))
    assert b"".join(pieces) == DATA[3:1001]
    assert len(pieces) > 1
    assert all(1 <= len(piece) <= 64 for piece in pieces)
    last = list(storage.read_range("r", len(DATA) - 1, len(DATA) - 1, chunk=1))
    assert last == [DATA[-1:]]


def test_read_range_rejects_bad_ranges(storage: ObjectStorage) -> None:
    storage.put_bytes("r", DATA)
    for start, end in [(5, 4), (-1, 3), (len(DATA), len(DATA) + 10)]:
        with pytest.raises(ValueError):
            storage.read_range("r", start, end)
    with pytest.raises(ValueError):
        storage.read_range("r", 0, 1, chunk=0)
    with pytest.raises(ObjectMissing):  # raised by the call, before iterating
        storage.read_range("absent", 0, 1)


def test_keys_under_a_prefix(storage: ObjectStorage) -> None:
    for key in ["a/1", "a/2", "a/deep/3", "ab/4", "b/5", "top"]:
        storage.put_bytes(key, key.encode())
    assert set(storage.keys("")) == {"a/1", "a/2", "a/deep/3", "ab/4", "b/5", "top"}
    assert set(storage.keys("a/")) == {"a/1", "a/2", "a/deep/3"}
    assert set(storage.keys("a")) == {"a/1", "a/2", "a/deep/3", "ab/4"}
    assert set(storage.keys("a/d")) == {"a/deep/3"}
    assert set(storage.keys("c/")) == set()
    for key in storage.keys("a/"):  # deleting while listing (garbage collection)
        storage.delete(key)
    assert set(storage.keys("")) == {"ab/4", "b/5", "top"}
    with pytest.raises(ValueError):
        list(storage.keys("../"))


def test_child_views_do_not_see_each_other(storage: ObjectStorage, tmp_path: Path) -> None:
    bank, uploads = child(storage, "bank"), child(storage, "uploads")
    bank.put_bytes("same/key", b"bank")
    uploads.put_bytes("same/key", b"uploads")
    source = tmp_path / "f.bin"
    source.write_bytes(DATA)
    uploads.put_file("file.bin", source, move=True)
    assert bank.get_bytes("same/key") == b"bank"
    assert uploads.get_bytes("same/key") == b"uploads"
    assert list(bank.keys("")) == ["same/key"]
    assert set(uploads.keys("")) == {"same/key", "file.bin"}
    assert set(storage.keys("")) == {"bank/same/key", "uploads/same/key", "uploads/file.bin"}
    assert not bank.exists("file.bin")
    assert b"".join(uploads.read_range("file.bin", 1, 2)) == DATA[1:3]
    with uploads.local_copy("file.bin") as path:
        assert path.read_bytes() == DATA
    nested = child(child(storage, "results"), "2024")
    nested.put_bytes("out.mp4", b"video")
    assert storage.get_bytes("results/2024/out.mp4") == b"video"
    assert "results/2024/" in nested.describe()
    bank.delete("same/key")
    assert uploads.exists("same/key")
    with pytest.raises(ObjectMissing):
        bank.get_bytes("same/key")
    with pytest.raises(ValueError):
        child(storage, "../up")


def test_missing_objects(storage: ObjectStorage, tmp_path: Path) -> None:
    for read in [
        lambda: storage.get_bytes("no/such"),
        lambda: storage.size("no/such"),
        lambda: storage.modified_at("no/such"),
        lambda: storage.download("no/such", tmp_path / "t"),
    ]:
        with pytest.raises(ObjectMissing) as caught:
            read()
        assert isinstance(caught.value, BankError)
        assert "no/such" in str(caught.value)


@pytest.mark.parametrize(
    "key", ["../x", "/abs", "a/../b", "a//b", "a/./b", ".hidden", "a/", "", "a\\b"]
)
def test_bad_keys_are_rejected(storage: ObjectStorage, key: str) -> None:
    with pytest.raises(ValueError):
        storage.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        storage.get_bytes(key)
    with pytest.raises(ValueError):
        storage.exists(key)


def test_describe(storage: ObjectStorage, tmp_path: Path) -> None:
    if isinstance(storage, LocalStorage):
        assert storage.describe() == f"folder {tmp_path / 'objects'}"
    else:
        assert isinstance(storage, S3Storage)
        assert storage.describe().startswith(f"s3://{storage.bucket}/test-")
        assert storage.endpoint_url in storage.describe()


def test_urls_and_local_paths(storage: ObjectStorage) -> None:
    storage.put_bytes("share/me.bin", DATA)
    url = storage.presigned_url("share/me.bin", 60)
    path = storage.local_path("share/me.bin")
    if isinstance(storage, LocalStorage):
        assert url is None
        assert path is not None and path.read_bytes() == DATA
    else:
        assert path is None
        assert url is not None
        with urllib.request.urlopen(url, timeout=10) as response:  # a plain GET, no credentials
            assert response.read() == DATA


# -- the local folder ------------------------------------------------------------------------------


def test_local_keys_are_paths_under_the_root(tmp_path: Path) -> None:
    local = LocalStorage(tmp_path)
    local.put_bytes("a/b.txt", b"x")
    assert (tmp_path / "a" / "b.txt").read_bytes() == b"x"
    assert local.local_path("a/b.txt") == tmp_path / "a" / "b.txt"
    assert oct((tmp_path / "a" / "b.txt").stat().st_mode & 0o777) == "0o644"
    for key in ["../x", "/abs", "a/../../x"]:
        with pytest.raises(ValueError):
            local.put_bytes(key, b"x")
        with pytest.raises(ValueError):
            local.local_path(key)
    assert not (tmp_path.parent / "x").exists()
    assert list(local.keys("")) == ["a/b.txt"]


def test_local_move_renames_and_refreshes_the_time(tmp_path: Path) -> None:
    local = LocalStorage(tmp_path / "objects")
    source = tmp_path / "upload.bin"
    source.write_bytes(DATA)
    source.chmod(0o600)
    os.utime(source, (1_000_000, 1_000_000))  # written long ago
    inode = source.stat().st_ino
    local.put_file("u/upload.bin", source, move=True)
    stored = tmp_path / "objects" / "u" / "upload.bin"
    assert stored.stat().st_ino == inode  # a rename, not a copy
    assert stored.stat().st_mode & 0o777 == 0o644
    assert local.modified_at("u/upload.bin") > time.time() - 60  # not taken for an old file


def test_a_failed_local_put_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = LocalStorage(tmp_path / "objects")
    local.put_bytes("kept", b"previous")
    source = tmp_path / "source.bin"
    source.write_bytes(DATA)

    def copy_half_then_fail(src: Path, dst: Path) -> None:
        Path(dst).write_bytes(Path(src).read_bytes()[:100])
        raise OSError("disk full")

    monkeypatch.setattr(storage_module.shutil, "copyfile", copy_half_then_fail)
    for key in ["new/file.bin", "kept"]:
        with pytest.raises(OSError, match="disk full"):
            local.put_file(key, source)
    assert files_under(tmp_path / "objects") == [tmp_path / "objects" / "kept"]
    assert local.get_bytes("kept") == b"previous"
    assert source.read_bytes() == DATA

    def fail_write(self: Path, data: bytes) -> int:
        with self.open("wb") as handle:
            handle.write(data[:10])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", fail_write)
    with pytest.raises(OSError, match="disk full"):
        local.put_bytes("new/bytes.bin", DATA)
    monkeypatch.undo()
    assert files_under(tmp_path / "objects") == [tmp_path / "objects" / "kept"]
    assert list(local.keys("")) == ["kept"]


def test_local_keys_skip_hidden_temporaries(tmp_path: Path) -> None:
    local = LocalStorage(tmp_path)
    local.put_bytes("a/x", b"1")
    (tmp_path / ".partial").mkdir(exist_ok=True)
    (tmp_path / ".partial" / ".x.0123.tmp").write_bytes(b"debris")
    (tmp_path / "a" / ".x.4567.tmp").write_bytes(b"debris")
    assert list(local.keys("")) == ["a/x"]


# -- S3 --------------------------------------------------------------------------------------------


def test_s3_big_files_are_uploaded_in_parts(s3_server: MotoServer, tmp_path: Path) -> None:
    s3 = S3Storage(
        s3_server.bucket,
        "multipart",
        endpoint_url=s3_server.endpoint_url,
        multipart_threshold=5 << 20,
    )
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom((5 << 20) + 1234))
    s3.put_file("big.bin", big, move=True)
    assert not big.exists()
    head = s3._client.head_object(Bucket=s3_server.bucket, Key="multipart/big.bin")
    assert head["ETag"].strip('"').endswith("-2")  # the ETag of a two-part upload
    assert s3.size("big.bin") == (5 << 20) + 1234
    tail = b"".join(s3.read_range("big.bin", (5 << 20) - 2, (5 << 20) + 1233))
    assert len(tail) == 1236


def test_s3_failures_name_the_bucket_and_key(s3_server: MotoServer, tmp_path: Path) -> None:
    missing = open_storage(
        "s3://no-such-bucket-ditmem/p", tmp_path, endpoint_url=s3_server.endpoint_url
    )
    with pytest.raises(StorageUnavailable) as caught:
        missing.put_bytes("k", b"x")
    assert isinstance(caught.value, BankError)
    assert "s3://no-such-bucket-ditmem/p/k" in str(caught.value)
    assert "NoSuchBucket" in str(caught.value)
    source = tmp_path / "f.bin"
    source.write_bytes(b"x")
    with pytest.raises(StorageUnavailable, match="no-such-bucket-ditmem"):
        missing.put_file("f", source, move=True)
    assert source.exists()  # a failed upload does not consume the source
    with pytest.raises(StorageUnavailable, match="no-such-bucket-ditmem"):
        list(missing.keys(""))


def test_s3_prefix_of_the_url(s3_server: MotoServer, tmp_path: Path) -> None:
    root = open_storage(f"s3://{s3_server.bucket}", tmp_path, endpoint_url=s3_server.endpoint_url)
    prefixed = open_storage(
        f"s3://{s3_server.bucket}/url-prefix/deeper/", tmp_path, endpoint_url=s3_server.endpoint_url
    )
    prefixed.put_bytes("k", b"v")
    assert root.get_bytes("url-prefix/deeper/k") == b"v"
    assert list(prefixed.keys("")) == ["k"]


# -- choosing a backend ----------------------------------------------------------------------------


def test_open_storage_picks_the_backend(tmp_path: Path) -> None:
    local = open_storage(None, tmp_path)
    assert isinstance(local, LocalStorage) and local.root == tmp_path
    s3 = open_storage("s3://bucket/some/prefix", tmp_path, endpoint_url="http://127.0.0.1:9")
    assert isinstance(s3, S3Storage)
    assert (s3.bucket, s3.prefix) == ("bucket", "some/prefix/")
    assert s3.describe() == "s3://bucket/some/prefix/ at http://127.0.0.1:9"
    for url in [
        "gs://bucket/x",
        "/data/bank",
        "s3://",
        "s3:///prefix",
        "s3://b/p?x=1",
        "s3://b/../x",
    ]:
        with pytest.raises(ValueError, match="storage URL"):
            open_storage(url, tmp_path)


def test_the_local_backend_never_imports_boto3(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from memory_bank.storage import child, open_storage\n"
        f"s = open_storage(None, Path({str(tmp_path)!r}))\n"
        "s.put_bytes('a/b', b'x')\n"
        "assert s.get_bytes('a/b') == b'x' and list(child(s, 'a').keys('')) == ['b']\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
