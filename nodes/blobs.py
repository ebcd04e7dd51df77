"""Where a storage node keeps its committed data files: a local directory or an S3 bucket.

A :class:`nodes.store.Store` stages uploads on local disk (fsync'd) and hands
each committed data file to a blob store under a name made only of hex
identifiers (``<object id>-<version>-<upload>.shares``). Two implementations:

- :class:`LocalBlobs`: the files live in ``<data dir>/objects/`` (the default;
  the data file is renamed into place after the catalog commit, and the
  rename is redone when the Store opens);
- :class:`S3Blobs`: the files live as objects ``<prefix><name>`` in a bucket
  of an object store at the node's own site (MinIO, Ceph RGW, AWS S3), reached
  with boto3. ``remote`` is True: the Store uploads the staged file *before*
  the catalog transaction, so a version never becomes visible while its data
  is not in the bucket; an upload whose commit did not happen is an orphan
  object that gc removes. Chunk reads are ranged GETs; large files go up in
  multipart uploads.

Two nodes must never share a bucket *and* prefix: each treats objects under
its prefix that its catalog does not name as orphans.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from qstore.errors import LocalError, RemoteError

__all__ = ["BlobReader", "BlobStore", "BlobStoreUnavailable", "LocalBlobs", "S3Blobs", "open_blobs"]


class BlobStoreUnavailable(RemoteError):
    """The node's object store refused or could not be reached: the node cannot serve this request now."""

    status = 503


class BlobReader(Protocol):
    def pread(self, length: int, offset: int) -> bytes: ...
    def preadinto(self, buffer: memoryview, offset: int) -> int: ...
    def close(self) -> None: ...


class BlobStore(Protocol):
    remote: bool  # True: committed data must be uploaded before the catalog commit

    def upload(self, src: Path, name: str) -> None:
        """Copy ``src`` into blob ``name``, durably (only called when ``remote``)."""

    def adopt(self, src: Path, name: str, *, uploaded: bool) -> None:
        """Make blob ``name`` hold ``src``'s bytes and remove ``src`` (``uploaded``: upload already done)."""

    def exists(self, name: str) -> bool: ...

    def delete(self, name: str) -> None:
        """Remove blob ``name``; a missing one is fine."""

    def open(self, name: str) -> BlobReader:
        """A reader of blob ``name``; FileNotFoundError when there is none."""

    def scan(self) -> Iterator[tuple[str, int]]:
        """(name, size) of every blob under this store (names not ours included: the caller filters)."""

    def sync(self) -> None:
        """Make renames done by :meth:`adopt` durable."""

    def close(self) -> None: ...


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FileReader:
    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def pread(self, length: int, offset: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def preadinto(self, buffer: memoryview, offset: int) -> int:
        return os.preadv(self.fd, [buffer], offset)

    def close(self) -> None:
        os.close(self.fd)


class LocalBlobs:
    """Data files in a directory of the node's own filesystem (today's layout: ``<data dir>/objects``)."""

    remote = False

    def __init__(self, directory: Path, *, fsync: bool = True):
        self.directory = Path(directory)
        self.fsync = fsync
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.directory / name

    def upload(self, src: Path, name: str) -> None:  # pragma: no cover - not remote
        raise LocalError("a local blob store takes files by adopt")

    def adopt(self, src: Path, name: str, *, uploaded: bool) -> None:
        os.replace(src, self.path(name))

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(name))

    def open(self, name: str) -> BlobReader:
        return _FileReader(self.path(name))

    def scan(self) -> Iterator[tuple[str, int]]:
        for entry in os.scandir(self.directory):
            with contextlib.suppress(FileNotFoundError):
                if entry.is_file(follow_symlinks=False):
                    yield entry.name, entry.stat().st_size

    def sync(self) -> None:
        if self.fsync:
            fsync_dir(self.directory)

    def close(self) -> None:
        pass


class _S3Reader:
    def __init__(self, blobs: S3Blobs, name: str):
        self.blobs, self.name = blobs, name

    def pread(self, length: int, offset: int) -> bytes:
        return self.blobs.get_range(self.name, offset, length)

    def preadinto(self, buffer: memoryview, offset: int) -> int:
        data = self.pread(len(buffer), offset)
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        pass


_MISSING = {"NoSuchKey", "404", "NotFound"}


class S3Blobs:
    """Data files as objects ``<prefix><name>`` in an S3 bucket (boto3; any S3-compatible endpoint).

    Credentials: ``access_key``/``secret_key`` when given, else boto3's usual
    chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile, an
    instance role). The bucket must exist unless ``create_bucket``.
    """

    remote = True

    def __init__(self, bucket: str, *, endpoint_url: str | None = None, prefix: str = "",
                 region: str | None = None, access_key: str | None = None, secret_key: str | None = None,
                 multipart_threshold: int = 64 << 20, multipart_chunksize: int = 16 << 20,
                 create_bucket: bool = False, client: Any = None):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if not bucket:
            raise LocalError("an S3 blob store needs a bucket")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.bucket, self.prefix = bucket, prefix
        if client is None:
            client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url or None, region_name=region or "us-east-1",
                aws_access_key_id=access_key or None, aws_secret_access_key=secret_key or None,
                config=Config(retries={"max_attempts": 4, "mode": "standard"}, max_pool_connections=32,
                              s3={"addressing_style": "path"}, connect_timeout=10, read_timeout=60))
        self.client = client
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold,
                                       multipart_chunksize=multipart_chunksize, use_threads=True)
        with self._errors("open"):
            try:
                self.client.head_bucket(Bucket=bucket)
            except self._client_error() as exc:
                missing = self._code(exc) in _MISSING | {"NoSuchBucket"}
                if missing and not create_bucket:
                    raise BlobStoreUnavailable(f"object store s3://{bucket}/{self.prefix}: no such bucket "
                                               "(create it first)") from None
                if not missing:
                    raise
                self.client.create_bucket(Bucket=bucket)

    @staticmethod
    def _client_error() -> type[Exception]:
        from botocore.exceptions import ClientError

        return ClientError

    @staticmethod
    def _code(exc: Exception) -> str:
        return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            raise BlobStoreUnavailable(f"object store s3://{self.bucket}/{self.prefix}: {what}: "
                                       f"{self._code(exc) or exc}") from exc
        except BotoCoreError as exc:
            raise BlobStoreUnavailable(f"object store s3://{self.bucket}/{self.prefix}: {what}: "
                                       f"{exc}") from exc

    def key(self, name: str) -> str:
        return self.prefix + name

    def upload(self, src: Path, name: str) -> None:
        # upload_file goes multipart above multipart_threshold and aborts the parts on failure.
        with self._errors(f"upload {name}"):
            self.client.upload_file(str(src), self.bucket, self.key(name), Config=self.transfer)

    def adopt(self, src: Path, name: str, *, uploaded: bool) -> None:
        if not uploaded and not self.exists(name):
            self.upload(src, name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(src)

    def exists(self, name: str) -> bool:
        with self._errors(f"head {name}"):
            try:
                self.client.head_object(Bucket=self.bucket, Key=self.key(name))
            except self._client_error() as exc:
                if self._code(exc) in _MISSING:
                    return False
                raise
        return True

    def delete(self, name: str) -> None:
        with self._errors(f"delete {name}"):
            self.client.delete_object(Bucket=self.bucket, Key=self.key(name))

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        if length <= 0:
            if not self.exists(name):
                raise FileNotFoundError(name)
            return b""
        with self._errors(f"read {name}"):
            try:
                r = self.client.get_object(Bucket=self.bucket, Key=self.key(name),
                                           Range=f"bytes={offset}-{offset + length - 1}")
            except self._client_error() as exc:
                code = self._code(exc)
                if code in _MISSING:
                    raise FileNotFoundError(name) from None
                if code == "InvalidRange":  # the object is shorter than offset: truncated
                    return b""
                raise
            with contextlib.closing(r["Body"]) as body:
                return body.read()

    def open(self, name: str) -> BlobReader:
        return _S3Reader(self, name)

    def scan(self) -> Iterator[tuple[str, int]]:
        with self._errors("list"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                          Prefix=self.prefix)
            for page in pages:
                for obj in page.get("Contents", ()):
                    name = obj["Key"][len(self.prefix):]
                    if "/" not in name:
                        yield name, int(obj["Size"])

    def sync(self) -> None:
        pass

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()


def open_blobs(kind: str, data_dir: Path, *, fsync: bool = True, **s3: Any) -> BlobStore:
    """The blob store a node's config names: ``local`` (``<data_dir>/objects``) or ``s3``."""
    if kind == "local":
        return LocalBlobs(Path(data_dir) / "objects", fsync=fsync)
    if kind == "s3":
        return S3Blobs(**s3)
    raise LocalError(f"blob_store must be 'local' or 's3', not {kind!r}")
