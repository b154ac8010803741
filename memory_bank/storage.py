"""Object storage: where files that every host must reach live (bank files, uploads, results).

One interface, :class:`ObjectStorage`, with two implementations picked by a URL (see
:func:`open_storage`):

* :class:`LocalStorage`: a folder on this host (or a shared mount). Keys are relative paths.
* :class:`S3Storage`: ``s3://bucket/prefix`` on AWS or any S3-compatible server (MinIO, Ceph,
  Cloudflare R2, moto) reached through ``endpoint_url``.

The S3 side uses boto3 because it is the reference S3 client: synchronous like our workers, with
presigned URLs, ranged GETs and multipart uploads built in, and it talks to every S3-compatible
server once given an ``endpoint_url``. It is imported lazily, inside :class:`S3Storage` only, so
a deployment on a local folder never loads it.

Keys are ``/``-separated paths such as ``bank/tokens/ab/abcd.safetensors``. The same rules hold
on both backends, so a key that works on one works on the other: not empty, not absolute, no
empty segment (``a//b``), no segment starting with ``.`` (which rules out ``.`` and ``..``; the
local backend keeps its own temporaries under hidden names), no backslash or NUL. A bad key is a
``ValueError``.

:func:`child` gives a view whose keys live under a prefix: the bank, uploads and results share one
storage as ``child(storage, "bank")``, ``child(storage, "uploads")`` and
``child(storage, "results")``, and none of them sees the others' keys.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from memory_bank.errors import BankError
from model.atomic import FILE_MODE, atomic_path

__all__ = [
    "ChildStorage",
    "LocalStorage",
    "ObjectMissing",
    "ObjectStorage",
    "S3Storage",
    "StorageUnavailable",
    "child",
    "open_storage",
]

#: Default size of the pieces :meth:`ObjectStorage.read_range` yields.
DEFAULT_CHUNK = 1 << 20


# Errors of a disk that cannot take a write: full, over quota, or mounted read-only.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
DISK_READ_ONLY = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def describe_disk_error(error: OSError) -> str:
    """What went wrong with a disk, without the internal path of the file."""
    if error.errno in DISK_FULL:
        return "the disk is full (no space left on the device)"
    if error.errno in DISK_READ_ONLY:
        return "the disk is read-only or not writable"
    return f"a disk error ({error.strerror or type(error).__name__})"


class ObjectMissing(BankError):
    """No object is stored under this key."""


class StorageUnavailable(BankError):
    """The storage backend refused or failed a request (bad credentials, missing bucket, network
    down, ...); the message names the bucket and key."""


class ObjectStorage(ABC):
    """A flat namespace of keys, each holding an immutable-once-written blob of bytes.

    Writes are atomic on both backends: a reader sees the previous object or the complete new one,
    never a partial write. Writing an existing key replaces it.
    """

    @abstractmethod
    def put_file(self, key: str, source: Path, *, move: bool = False) -> None:
        """Store the content of the local file ``source`` under ``key``.

        With ``move=True`` the source is consumed: the local backend renames it into place when it
        is on the same filesystem, S3 deletes it after the upload. Without it the source is left
        as it was.
        """

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The whole object; raises :class:`ObjectMissing` if there is none."""

    @abstractmethod
    def download(self, key: str, target: Path) -> Path:
        """Write the object to the local file ``target`` (atomically, parents created); returns
        ``target``. Raises :class:`ObjectMissing` if there is none."""

    @abstractmethod
    def local_copy(self, key: str) -> AbstractContextManager[Path]:
        """A readable local file holding the object for the duration of a ``with`` block.

        The local backend yields the stored file itself (no copy: never write to it); S3 downloads
        a temporary copy and deletes it when the block ends. The file name keeps the key's last
        segment, so readers that pick a format from the suffix work. Raises
        :class:`ObjectMissing` on entry if there is no object.
        """

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes; raises :class:`ObjectMissing` if there is none."""

    @abstractmethod
    def read_range(
        self, key: str, start: int, end: int, chunk: int = DEFAULT_CHUNK
    ) -> Iterator[bytes]:
        """Stream bytes ``start`` to ``end`` inclusive (as in an HTTP ``Range`` header), in pieces
        of at most ``chunk`` bytes.

        The object is opened when this is called, so :class:`ObjectMissing` is raised here rather
        than on the first ``next()``. An ``end`` past the last byte is clamped to it. Raises
        ``ValueError`` if ``start`` is negative, after ``end``, or not before the object's size.
        """

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; a key with no object is fine."""

    @abstractmethod
    def keys(self, prefix: str) -> Iterator[str]:
        """Every key that starts with ``prefix`` (``""``: all of them), in no particular order.

        The prefix is a plain string prefix on both backends: ``"a/"`` lists the keys in folder
        ``a``, ``"a"`` also lists ``ab/c``. Meant for garbage collection: deleting keys while
        iterating is fine.
        """

    @abstractmethod
    def modified_at(self, key: str) -> float:
        """When the object was last written, in epoch seconds; :class:`ObjectMissing` if none."""

    @abstractmethod
    def presigned_url(self, key: str, expires_s: int) -> str | None:
        """A URL any HTTP client can GET the object from for ``expires_s`` seconds, or ``None``
        when the backend has no URLs (local storage). Whether the object exists is not checked."""

    @abstractmethod
    def local_path(self, key: str) -> Path | None:
        """The path of the stored file when the backend is a local folder (so an HTTP server can
        send it directly), else ``None``. The file may not exist."""

    @abstractmethod
    def describe(self) -> str:
        """Where the objects live, for logs and error messages, e.g. ``folder /data``."""


# -- keys ------------------------------------------------------------------------------------------


def _check_key(key: str) -> str:
    """``key`` if it follows the rules of the module docstring, else ``ValueError``."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"storage key must be a non-empty string, got {key!r}")
    if "\\" in key or "\x00" in key:
        raise ValueError(f"storage key {key!r} contains a backslash or NUL")
    if key.startswith("/"):
        raise ValueError(f"storage key {key!r} is absolute; keys are relative paths")
    for segment in key.split("/"):
        if not segment:
            raise ValueError(f"storage key {key!r} has an empty segment")
        if segment.startswith("."):
            raise ValueError(f"storage key {key!r} has a segment starting with '.'")
    return key


def _check_prefix(prefix: str) -> str:
    """A :meth:`ObjectStorage.keys` prefix: ``""``, or the start of a key (``"a/"``, ``"a/b"``)."""
    if prefix:
        try:
            _check_key(prefix + "x" if prefix.endswith("/") else prefix)
        except ValueError:
            raise ValueError(f"invalid storage key prefix {prefix!r}") from None
    return prefix


def _is_key(key: str) -> bool:
    try:
        _check_key(key)
    except ValueError:
        return False
    return True


def _check_range(start: int, end: int, chunk: int) -> None:
    if start < 0 or end < start:
        raise ValueError(f"invalid byte range {start}-{end}")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 byte, got {chunk}")


# -- a local folder --------------------------------------------------------------------------------


class LocalStorage(ObjectStorage):
    """Objects as files in a folder: key ``a/b.bin`` is ``<root>/a/b.bin``.

    Every write is built in ``<root>/.partial/`` and renamed into place (:func:`atomic_path`), so
    an interrupted write leaves debris only there (never listed by :meth:`keys`; safe to empty
    when no writer runs). Deleting an object leaves its folder, even empty: another writer may be
    about to rename a file into it.
    """

    PARTIAL = ".partial"

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_check_key(key).split("/"))

    def _write(self, key: str) -> AbstractContextManager[Path]:
        return atomic_path(self._path(key), tmp_dir=self.root / self.PARTIAL)

    def put_file(self, key: str, source: Path, *, move: bool = False) -> None:
        target = self._path(key)
        source = Path(source)
        if move:
            if not source.is_file():
                raise FileNotFoundError(f"{source} is not a file")
            target.parent.mkdir(parents=True, exist_ok=True)
            # A rename keeps the source's times; refresh them first, or garbage collection
            # (which spares recent objects) could take a just-stored file for an old one.
            os.utime(source)
            source.chmod(FILE_MODE)
            try:
                os.replace(source, target)
                return
            except OSError as error:
                if error.errno != errno.EXDEV:
                    raise
            # Another filesystem: copy atomically, then consume the source.
        with self._write(key) as tmp:
            shutil.copyfile(source, tmp)
        if move:
            source.unlink()

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._write(key) as tmp:
            tmp.write_bytes(data)

    def get_bytes(self, key: str) -> bytes:
        with self._open(key) as handle:
            return handle.read()

    def download(self, key: str, target: Path) -> Path:
        target = Path(target)
        with self._open(key) as handle, atomic_path(target) as tmp, tmp.open("wb") as out:
            shutil.copyfileobj(handle, out, DEFAULT_CHUNK)
        return target

    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        path = self._path(key)
        if not path.is_file():
            raise self._missing(key)
        yield path

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        return self._stat(key).st_size

    def read_range(
        self, key: str, start: int, end: int, chunk: int = DEFAULT_CHUNK
    ) -> Iterator[bytes]:
        _check_range(start, end, chunk)
        handle = self._open(key)
        try:
            size = os.fstat(handle.fileno()).st_size
            if start >= size:
                raise ValueError(
                    f"byte range {start}-{end} starts past the end of {key!r} ({size})"
                )
            handle.seek(start)
        except BaseException:
            handle.close()
            raise
        return _stream_file(handle, min(end, size - 1) - start + 1, chunk)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def keys(self, prefix: str) -> Iterator[str]:
        _check_prefix(prefix)
        folder = prefix.rpartition("/")[0]
        start = self.root.joinpath(*folder.split("/")) if folder else self.root
        for base, folders, files in os.walk(start):
            folders[:] = sorted(name for name in folders if not name.startswith("."))
            relative = Path(base).relative_to(self.root).as_posix()
            for name in sorted(files):
                if name.startswith("."):
                    continue
                key = name if relative == "." else f"{relative}/{name}"
                if key.startswith(prefix):
                    yield key

    def modified_at(self, key: str) -> float:
        return self._stat(key).st_mtime

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        _check_key(key)
        return None

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def describe(self) -> str:
        return f"folder {self.root}"

    def _open(self, key: str) -> IO[bytes]:
        path = self._path(key)
        try:
            return path.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._missing(key) from None

    def _stat(self, key: str) -> os.stat_result:
        path = self._path(key)
        try:
            result = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise self._missing(key) from None
        if not path.is_file():
            raise self._missing(key)
        return result

    def _missing(self, key: str) -> ObjectMissing:
        return ObjectMissing(f"no object {key!r} in {self.describe()}")


def _stream_file(handle: IO[bytes], remaining: int, chunk: int) -> Iterator[bytes]:
    with handle:
        while remaining > 0:
            piece = handle.read(min(chunk, remaining))
            if not piece:  # the file shrank under us
                return
            remaining -= len(piece)
            yield piece


# -- S3 --------------------------------------------------------------------------------------------

# Error codes S3 servers answer for a key (or, on HEAD, anything) that is not there.
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


class S3Storage(ObjectStorage):
    """Objects in an S3 bucket, below an optional prefix: key ``a/b`` is ``<prefix>/a/b``.

    Credentials come from boto3's standard chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
    ``AWS_PROFILE``, ``~/.aws``, instance roles, ...). The region is ``region``, else the chain's,
    else ``us-east-1``. ``endpoint_url`` points at an S3-compatible server (requests then use
    path-style addressing, which all of them accept); without it boto3 also honours
    ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``. Nothing is sent until the first request.

    Files above ``multipart_threshold`` bytes are uploaded in parallel parts. :meth:`local_copy`
    downloads into ``scratch_dir`` (default: the system temporary folder).

    A missing key raises :class:`ObjectMissing`; any other failure :class:`StorageUnavailable`.
    (On HEAD requests, used by :meth:`exists`, :meth:`size` and :meth:`modified_at`, S3 answers a
    bare 404 for a missing bucket too, so those report the object missing.)
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        multipart_threshold: int = 16 << 20,
        scratch_dir: Path | None = None,
    ) -> None:
        import boto3
        import boto3.exceptions
        import boto3.s3.transfer
        import botocore.config
        import botocore.exceptions

        if not bucket:
            raise ValueError("S3 storage needs a bucket name")
        prefix = prefix.strip("/")
        if prefix:
            _check_key(prefix)
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.scratch_dir = scratch_dir
        session = boto3.session.Session()
        self.region = region or session.region_name or "us-east-1"
        self._client: Any = session.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=self.region,
            config=botocore.config.Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"} if endpoint_url else {},
                retries={"mode": "standard", "max_attempts": 4},
                connect_timeout=10,
                read_timeout=60,
            ),
        )
        self._transfer = boto3.s3.transfer.TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=max(multipart_threshold, 5 << 20),  # S3's smallest part: 5 MiB
        )
        self._client_error = botocore.exceptions.ClientError
        self._failures: tuple[type[Exception], ...] = (
            botocore.exceptions.ClientError,
            botocore.exceptions.BotoCoreError,
            boto3.exceptions.Boto3Error,
        )

    @property
    def endpoint_url(self) -> str:
        """The server requests go to (resolved by boto3 when none was given)."""
        return self._client.meta.endpoint_url

    def put_file(self, key: str, source: Path, *, move: bool = False) -> None:
        source = Path(source)
        if not source.is_file():
            raise FileNotFoundError(f"{source} is not a file")
        with self._requests("upload", key):
            self._client.upload_file(
                str(source), self.bucket, self._full(key), Config=self._transfer
            )
        if move:
            source.unlink()

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._requests("PUT", key):
            self._client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data)

    def get_bytes(self, key: str) -> bytes:
        with self._requests("GET", key):
            response = self._client.get_object(Bucket=self.bucket, Key=self._full(key))
            with contextlib.closing(response["Body"]) as body:
                return body.read()

    def download(self, key: str, target: Path) -> Path:
        target = Path(target)
        with self._requests("download", key), atomic_path(target) as tmp:
            self._client.download_file(self.bucket, self._full(key), str(tmp))
        return target

    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        folder = Path(tempfile.mkdtemp(prefix="ditmem-s3-", dir=self.scratch_dir))
        try:
            yield self.download(key, folder / key.rpartition("/")[2])
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except ObjectMissing:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def read_range(
        self, key: str, start: int, end: int, chunk: int = DEFAULT_CHUNK
    ) -> Iterator[bytes]:
        _check_range(start, end, chunk)
        with self._requests("ranged GET", key):
            try:
                response = self._client.get_object(
                    Bucket=self.bucket, Key=self._full(key), Range=f"bytes={start}-{end}"
                )
            except self._client_error as error:
                if error.response.get("Error", {}).get("Code") != "InvalidRange":
                    raise
                raise ValueError(
                    f"byte range {start}-{end} starts past the end of {self._where(key)}"
                ) from None
        body = response["Body"]
        if not response.get("ContentRange"):
            # A server that ignores Range sends the whole object: refuse rather than stream the
            # wrong bytes.
            body.close()
            raise StorageUnavailable(f"{self._where(key)} ignored the Range header of a ranged GET")
        return self._stream(body, key, chunk)

    def _stream(self, body: Any, key: str, chunk: int) -> Iterator[bytes]:
        with contextlib.closing(body), self._requests("ranged GET", key):
            yield from body.iter_chunks(chunk)

    def delete(self, key: str) -> None:
        with self._requests("DELETE", key):
            self._client.delete_object(Bucket=self.bucket, Key=self._full(key))

    def keys(self, prefix: str) -> Iterator[str]:
        _check_prefix(prefix)
        paginator = self._client.get_paginator("list_objects_v2")
        skip = len(self.prefix)
        with self._requests("LIST", prefix):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents", ()):
                    key = item["Key"][skip:]
                    if _is_key(key):  # folder markers ("a/") and foreign names
                        yield key

    def modified_at(self, key: str) -> float:
        return self._head(key)["LastModified"].timestamp()

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        with self._requests("presign", key):
            return self._client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self._full(key)},
                ExpiresIn=expires_s,
            )

    def local_path(self, key: str) -> Path | None:
        _check_key(key)
        return None

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} at {self.endpoint_url}"

    def _full(self, key: str) -> str:
        return self.prefix + _check_key(key)

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key} at {self.endpoint_url}"

    def _head(self, key: str) -> dict[str, Any]:
        with self._requests("HEAD", key):
            return self._client.head_object(Bucket=self.bucket, Key=self._full(key))

    @contextmanager
    def _requests(self, operation: str, key: str) -> Iterator[None]:
        """Translate boto3's exceptions raised in the block into ours, naming bucket and key."""
        try:
            yield
        except self._failures as error:
            code = ""
            if isinstance(error, self._client_error):
                code = str(error.response.get("Error", {}).get("Code", ""))
            if code in _MISSING_CODES:
                raise ObjectMissing(f"no object {self._where(key)}") from error
            message = f"S3 {operation} of {self._where(key)} failed: {error}"
            raise StorageUnavailable(message) from error


# -- views under a prefix --------------------------------------------------------------------------


class ChildStorage(ObjectStorage):
    """The keys of ``parent`` under ``prefix/``, seen without the prefix (see :func:`child`)."""

    def __init__(self, parent: ObjectStorage, prefix: str) -> None:
        prefix = _check_key(prefix.strip("/"))
        if isinstance(parent, ChildStorage):  # a child of a child: one level of indirection
            parent, prefix = parent.parent, f"{parent.prefix}/{prefix}"
        self.parent = parent
        self.prefix = prefix

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{_check_key(key)}"

    def put_file(self, key: str, source: Path, *, move: bool = False) -> None:
        self.parent.put_file(self._full(key), source, move=move)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.parent.put_bytes(self._full(key), data)

    def get_bytes(self, key: str) -> bytes:
        return self.parent.get_bytes(self._full(key))

    def download(self, key: str, target: Path) -> Path:
        return self.parent.download(self._full(key), target)

    def local_copy(self, key: str) -> AbstractContextManager[Path]:
        return self.parent.local_copy(self._full(key))

    def exists(self, key: str) -> bool:
        return self.parent.exists(self._full(key))

    def size(self, key: str) -> int:
        return self.parent.size(self._full(key))

    def read_range(
        self, key: str, start: int, end: int, chunk: int = DEFAULT_CHUNK
    ) -> Iterator[bytes]:
        return self.parent.read_range(self._full(key), start, end, chunk)

    def delete(self, key: str) -> None:
        self.parent.delete(self._full(key))

    def keys(self, prefix: str) -> Iterator[str]:
        _check_prefix(prefix)
        skip = len(self.prefix) + 1
        for key in self.parent.keys(f"{self.prefix}/{prefix}"):
            yield key[skip:]

    def modified_at(self, key: str) -> float:
        return self.parent.modified_at(self._full(key))

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        return self.parent.presigned_url(self._full(key), expires_s)

    def local_path(self, key: str) -> Path | None:
        return self.parent.local_path(self._full(key))

    def describe(self) -> str:
        return f"{self.prefix}/ in {self.parent.describe()}"


def child(storage: ObjectStorage, prefix: str) -> ObjectStorage:
    """A view of ``storage`` whose key ``k`` is ``storage``'s ``prefix/k``.

    Views under different prefixes never see each other's keys; the parent sees them all. Writing
    through a view has the parent's guarantees (atomic writes, ...). ``prefix`` follows the key
    rules and may have several segments (``"tenants/a"``).
    """
    return ChildStorage(storage, prefix)


# -- choosing a backend ----------------------------------------------------------------------------


def open_storage(
    url: str | None, local_root: Path, *, endpoint_url: str | None = None
) -> ObjectStorage:
    """The storage a deployment configured.

    ``None`` is the folder ``local_root`` (:class:`LocalStorage`; ``endpoint_url`` is then
    unused); ``s3://bucket`` or ``s3://bucket/prefix`` is :class:`S3Storage`, on
    ``endpoint_url`` when given. Anything else is a ``ValueError`` naming the URL.
    """
    if url is None:
        return LocalStorage(local_root)
    bucket, prefix = parse_storage_url(url)
    return S3Storage(bucket, prefix, endpoint_url=endpoint_url)


def parse_storage_url(url: str) -> tuple[str, str]:
    """``s3://bucket[/prefix]`` -> ``(bucket, prefix)``; anything else is a ``ValueError``."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(
            f"unsupported storage URL {url!r}: expected s3://bucket[/prefix], or none for the "
            "local folder"
        )
    prefix = parts.path.strip("/")
    if prefix and not _is_key(prefix):
        raise ValueError(f"storage URL {url!r} has an invalid prefix {prefix!r}")
    return parts.netloc, prefix
