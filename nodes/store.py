"""A storage node's shares on disk: uploads, committed versions, garbage collection, scrubbing.

Layout under the node's ``root``::

    catalog.sqlite3       the catalog (:mod:`nodes.catalog`), WAL mode
    staging/<upload>.part  the data file of an upload in progress
    objects/<object id>-<version>-<upload>.shares   the data file of a committed version
                          (or, with an S3 blob store, the object ``<prefix><same name>`` in its bucket:
                          :mod:`nodes.blobs`)
    lock                  flock'd while a Store has the directory open

A data file holds the chunk bodies of one version in arrival order; the
catalog says where each chunk lies and what its SHA-256 was on arrival.
File names come only from hex identifiers, never from a bucket or key.

The life of an upload (h11 style: the table below is ``TRANSITIONS``, and a
test checks that the two agree)::

    state      event      next state   notes
    (none)     begin      open         data file created in staging/
    open       begin      open         same id and fields: a retry
    open       write      open         a chunk appended; the same chunk again is a no-op
    open       prepare    prepared     every chunk present; data and directory fsync'd
    open       abort      (none)       also gc after staging_ttl_s idle, and any restart
    prepared   begin      prepared     same id and fields: a retry
    prepared   write      prepared     only a retry of a chunk already there
    prepared   prepare    prepared     same chunk count
    prepared   commit     committed    catalog rows, then the file moves into objects/
    prepared   abort      (none)       also gc after staging_ttl_s
    committed  commit     committed    returns the Version again
    committed  abort      committed    nothing to do

An open upload lives in memory only: its data was never fsync'd, so after a
restart nothing about it can be trusted, and its file is an orphan for gc.

Crash safety. The commit point is one SQLite transaction (synchronous=FULL)
that inserts the version row and removes the upload row; the data it names
was fsync'd, with its directory entry, at prepare. The rename from staging/
to objects/ comes after that transaction and is redone when the Store opens
(a committed upload whose file is still in staging/ is moved). So a crash
before the transaction leaves no version (a prepared upload, or an orphan
file, both collected by gc) and a crash after it leaves the whole version.
With a remote blob store (S3) the staged file is uploaded *before* that
transaction, so a version is never visible while its data is not in the
bucket; a crash between upload and transaction leaves an orphan object, which
gc removes. The staged file is deleted after the transaction (and at open).
Removals go the other way: rows first, durably, then files, so a crash
leaves an orphan file at worst, never a row without its data.

Concurrency: one lock guards the catalog and the table of open uploads;
writes, fsyncs, reads and hashing run outside it (an upload counts the
threads using its file descriptor, and abort waits for them), so the node's
event loop can call the quick methods while a worker thread writes 4 MiB.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import fcntl
import hashlib
import hmac
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from nodes.blobs import BlobReader, BlobStore, LocalBlobs, fsync_dir
from nodes.catalog import (
    MAX_CHUNKS,
    Bucket,
    Catalog,
    ChunkRow,
    InvalidName,
    Upload,
    Version,
    check_bucket,
    check_key,
    check_object_id,
    check_upload_id,
    check_version,
    encode_meta,
)
from qstore.errors import (
    BucketNotEmpty,
    Conflict,
    FrameError,
    LocalError,
    NoSuchBucket,
    NoSuchKey,
    NotFound,
    RemoteError,
    ShareCorruption,
)
from qstore.framing import FrameHeader

__all__ = [
    "TRANSITIONS",
    "BadChunk",
    "Bucket",
    "Event",
    "GCReport",
    "InvalidName",
    "ScrubReport",
    "State",
    "StorageFull",
    "Store",
    "Upload",
    "Version",
]

BytesLike = bytes | bytearray | memoryview


class StorageFull(RemoteError):
    """The node's disk is full: the put fails here, the client may still reach its quorum elsewhere."""

    status = 507


class State(enum.Enum):
    NONE = "(none)"
    OPEN = "open"
    PREPARED = "prepared"
    COMMITTED = "committed"


class Event(enum.Enum):
    BEGIN = "begin"
    WRITE = "write"
    PREPARE = "prepare"
    COMMIT = "commit"
    ABORT = "abort"


TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.NONE, Event.BEGIN): State.OPEN,
    (State.OPEN, Event.BEGIN): State.OPEN,
    (State.OPEN, Event.WRITE): State.OPEN,
    (State.OPEN, Event.PREPARE): State.PREPARED,
    (State.OPEN, Event.ABORT): State.NONE,
    (State.PREPARED, Event.BEGIN): State.PREPARED,
    (State.PREPARED, Event.WRITE): State.PREPARED,
    (State.PREPARED, Event.PREPARE): State.PREPARED,
    (State.PREPARED, Event.COMMIT): State.COMMITTED,
    (State.PREPARED, Event.ABORT): State.NONE,
    (State.COMMITTED, Event.COMMIT): State.COMMITTED,
    (State.COMMITTED, Event.ABORT): State.COMMITTED,
}


def _expect(state: State, event: Event, upload_id: str) -> State:
    """The next state, or the error a request out of turn gets."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        if state is State.NONE:
            raise NotFound(f"no upload {upload_id}") from None
        raise Conflict(f"upload {upload_id} is {state.value}: cannot {event.value}") from None


@dataclass(frozen=True)
class BadChunk:
    bucket: str
    key: str
    object_id: bytes
    version: int
    index: int
    reason: str


@dataclass(frozen=True)
class ScrubReport:
    chunks_checked: int
    bytes_checked: int
    bad: tuple[BadChunk, ...]
    pass_complete: bool  # this call reached the end of the catalog (the next one starts over)


@dataclass(frozen=True)
class GCReport:
    stale_uploads: int
    stale_bytes: int
    superseded_versions: int
    superseded_bytes: int
    orphan_files: int
    orphan_bytes: int
    moved_forward: int  # committed data files found still in staging/ and moved into objects/


@dataclass(eq=False)
class _Open:
    """An upload in state open (or being prepared): in memory only."""

    upload: Upload
    fd: int
    path: Path
    last_activity: float
    size: int = 0
    chunks: dict[int, ChunkRow] = field(default_factory=dict)
    pending: dict[int, ChunkRow] = field(default_factory=dict)  # being written by some thread
    busy: int = 0  # threads using fd outside the lock
    preparing: bool = False
    gone: bool = False  # aborted: the last user of fd closes nothing, abort does after busy == 0


_STAGING = re.compile(r"([0-9a-f]{32})\.part")
_OBJECT = re.compile(r"([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{32})\.shares")
_SCRUB_BATCH = 256
_MAX_NAMED = 5


def _pwrite_all(fd: int, data: BytesLike, offset: int) -> None:
    mv = memoryview(data).cast("B")
    while mv:
        n = os.pwrite(fd, mv, offset)
        mv, offset = mv[n:], offset + n


def _raise_if_full(exc: OSError) -> None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise StorageFull("no space left on this node") from exc


def _name_some(indices: Iterator[int] | list[int]) -> str:
    out = []
    for i in indices:
        if len(out) == _MAX_NAMED:
            out.append("...")
            break
        out.append(str(i))
    return ", ".join(out)


class Store:
    """One node's shares and catalog under ``root``; safe to call from several threads."""

    def __init__(self, root: Path, *, clock: Callable[[], float] = time.time, fsync: bool = True,
                 blobs: BlobStore | None = None, catalog_url: str | None = None,
                 catalog_schema: str | None = None):
        self.root = Path(root)
        self.clock = clock
        self.fsync = fsync
        self.staging = self.root / "staging"
        for d in (self.root, self.staging):
            d.mkdir(parents=True, exist_ok=True)
        self.blobs: BlobStore = blobs if blobs is not None else LocalBlobs(self.root / "objects", fsync=fsync)
        self._lockfd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lockfd)
            raise LocalError(f"{self.root} is in use by another store") from None
        try:
            self._catalog: Catalog | None = Catalog(self.root / "catalog.sqlite3", fsync=fsync,
                                                    url=catalog_url, schema=catalog_schema)
        except BaseException:
            os.close(self._lockfd)
            raise
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._open: dict[str, _Open] = {}
        self._uploaded_name: dict[str, str] = {}  # remote blobs: commits whose data is going up
        # Tests set this to copy the directory (a crash image) at named points.
        self._crash_hook: Callable[[str], None] = lambda point: None
        with self._lock:
            self._roll_forward()

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Abort uploads still open (they would not survive a restart anyway) and release the directory."""
        with self._lock:
            if self._catalog is None:
                return
            for upload_id in list(self._open):
                self._abort_open(upload_id)
            self._catalog.close()
            self._catalog = None
            os.close(self._lockfd)
            self.blobs.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def _db(self) -> Catalog:
        if self._catalog is None:
            raise LocalError("the store is closed")
        return self._catalog

    @staticmethod
    def _blob_name(object_id: bytes, version: int, upload_id: str) -> str:
        return f"{object_id.hex()}-{version:016x}-{upload_id}.shares"

    def _staging_path(self, upload_id: str) -> Path:
        return self.staging / f"{upload_id}.part"

    def _roll_forward(self) -> int:
        """Finish renames that a crash cut short: committed uploads whose file is still in staging/."""
        moved = 0
        for entry in os.scandir(self.staging):
            m = _STAGING.fullmatch(entry.name)
            if not m:
                continue
            v = self._db.version_of_upload(m[1])
            if v is not None:
                self.blobs.adopt(Path(entry.path), self._blob_name(v.object_id, v.version, m[1]),
                                 uploaded=False)
                moved += 1
        if moved:
            self.blobs.sync()
        return moved

    # -- buckets ---------------------------------------------------------------------

    def create_bucket(self, name: str) -> bool:
        """Create ``name``; False when it already existed (creating twice is not an error)."""
        check_bucket(name)
        with self._lock:
            return self._db.add_bucket(name, self.clock())

    def delete_bucket(self, name: str) -> None:
        """Delete an empty bucket (tombstones and superseded versions do not count, and go with it)."""
        check_bucket(name)
        with self._lock:
            db = self._db
            if not db.has_bucket(name):
                raise NoSuchBucket(name)
            if db.has_live_object(name):
                raise BucketNotEmpty(name)
            doomed = [self._blob_name(v.object_id, v.version, u) for u in db.data_files_of_bucket(name)
                      if (v := db.version_of_upload(u)) is not None]
            db.drop_bucket(name)
        for blob in doomed:  # rows are gone: a crash here leaves orphans for gc, never rows without data
            self.blobs.delete(blob)

    def buckets(self) -> list[Bucket]:
        with self._lock:
            return self._db.buckets()

    def has_bucket(self, name: str) -> bool:
        check_bucket(name)
        with self._lock:
            return self._db.has_bucket(name)

    def _need_bucket(self, name: str) -> None:
        if not self._db.has_bucket(name):
            raise NoSuchBucket(name)

    # -- uploads ---------------------------------------------------------------------

    def _state(self, upload_id: str) -> State:
        if upload_id in self._open:
            return State.OPEN
        if self._db.prepared(upload_id) is not None:
            return State.PREPARED
        if self._db.version_of_upload(upload_id) is not None:
            return State.COMMITTED
        return State.NONE

    def _repairable(self, v: Version) -> bool:
        """A committed version may be written again only when this node's copy is known bad or gone."""
        upload_id = self._db.data_file(v.object_id, v.version)
        if upload_id is None:  # a tombstone
            return False
        return self._db.has_bad(upload_id) or not self.blobs.exists(
            self._blob_name(v.object_id, v.version, upload_id))

    def _check_slot(self, up: Upload) -> bool:
        """May ``up`` write its (object_id, version) here? True when it would repair a committed copy."""
        v = self._db.version(up.object_id, up.version)
        if v is None:
            return False
        if v.deleted or (v.bucket, v.key, v.x, v.k, v.n) != (up.bucket, up.key, up.x, up.k, up.n):
            raise Conflict(f"version {up.version} of object {up.object_id.hex()} exists here "
                           "as something else")
        if not self._repairable(v):
            raise Conflict(f"version {up.version} of {up.bucket}/{up.key} is already committed here")
        return True

    def begin(self, upload: Upload) -> None:
        """Open an upload; a retry with identical fields is a no-op."""
        if not isinstance(upload, Upload):
            raise LocalError("begin needs an Upload")
        upload_id = upload.upload_id
        with self._lock:
            db = self._db
            self._need_bucket(upload.bucket)
            state = self._state(upload_id)
            if state is State.OPEN:
                same = self._open[upload_id].upload == upload
            elif state is State.PREPARED:
                same = db.prepared(upload_id).upload == upload  # type: ignore[union-attr]
            else:
                same = state is State.NONE
            if not same:
                raise Conflict(f"upload {upload_id} exists with other parameters or is committed")
            _expect(state, Event.BEGIN, upload_id)
            if state is not State.NONE:
                return
            self._check_slot(upload)
            path = self._staging_path(upload_id)
            try:
                # O_TRUNC: a file of this name can only be an orphan of an earlier run.
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                _raise_if_full(exc)
                raise
            self._open[upload_id] = _Open(upload, fd, path, self.clock())
        self._crash_hook("begin")

    def write_chunk(self, upload_id: str, header: FrameHeader, body: BytesLike) -> None:
        """Append one chunk's share; the same chunk again (same digest) is a client retry, a no-op."""
        check_upload_id(upload_id)
        if not isinstance(header, FrameHeader):
            raise LocalError("write_chunk needs a FrameHeader")
        if len(body) != header.body_length:
            raise ShareCorruption(f"chunk {header.chunk_index}: body is {len(body)} bytes, "
                                  f"header says {header.body_length}")
        digest = hashlib.sha256(body).digest()
        if not hmac.compare_digest(digest, header.digest):
            raise ShareCorruption(f"chunk {header.chunk_index}: body does not match its digest")
        index = header.chunk_index
        with self._lock:
            up = self._open.get(upload_id)
            if up is None:
                return self._write_after_prepare(upload_id, header, digest)
            u = up.upload
            if (header.object_id, header.object_version, header.x, header.k, header.n) != (
                    u.object_id, u.version, u.x, u.k, u.n):
                raise FrameError(f"frame does not belong to upload {upload_id}")
            have = up.chunks.get(index) or up.pending.get(index)
            if have is not None:
                if hmac.compare_digest(have.digest, digest):
                    return None
                raise Conflict(f"chunk {index} of upload {upload_id} was sent before with other content")
            if up.preparing:
                raise Conflict(f"upload {upload_id} is being prepared: no new chunks")
            row = ChunkRow(index, up.size, len(body), digest)
            up.size += len(body)
            up.pending[index] = row
            up.busy += 1
            up.last_activity = self.clock()
        ok = False
        try:
            _pwrite_all(up.fd, body, row.offset)
            ok = True
        except OSError as exc:
            _raise_if_full(exc)
            raise
        finally:
            with self._lock:
                up.busy -= 1
                del up.pending[index]
                if ok:
                    up.chunks[index] = row
                self._cond.notify_all()
        self._crash_hook("write")
        return None

    def _write_after_prepare(self, upload_id: str, header: FrameHeader, digest: bytes) -> None:
        state = self._state(upload_id)
        if state is State.COMMITTED:  # for a writer, a committed upload is gone
            raise NotFound(f"upload {upload_id} is committed")
        _expect(state, Event.WRITE, upload_id)
        p = self._db.prepared(upload_id)
        if p is None:  # pragma: no cover - state is PREPARED
            raise NotFound(f"no upload {upload_id}")
        u = p.upload
        if (header.object_id, header.object_version, header.x, header.k, header.n) != (
                u.object_id, u.version, u.x, u.k, u.n):
            raise FrameError(f"frame does not belong to upload {upload_id}")
        have = self._db.chunk_digest(upload_id, header.chunk_index)
        if have is None or not hmac.compare_digest(have, digest):
            raise Conflict(f"upload {upload_id} is prepared: no new chunks")

    def prepare(self, upload_id: str, *, chunks: int) -> None:
        """Check that chunks 0..chunks-1 (and no others) are here and make them durable."""
        check_upload_id(upload_id)
        if not isinstance(chunks, int) or isinstance(chunks, bool) or not 0 <= chunks <= MAX_CHUNKS:
            raise LocalError(f"chunks must be an integer in [0, {MAX_CHUNKS}]")
        with self._lock:
            # Wait out writes in flight (and a concurrent prepare), then look again.
            while (up := self._open.get(upload_id)) is not None and up.busy:
                self._cond.wait()
            if up is None:
                state = self._state(upload_id)
                _expect(state, Event.PREPARE, upload_id)
                p = self._db.prepared(upload_id)
                if p is not None and p.chunks != chunks:
                    raise Conflict(f"upload {upload_id} was prepared with {p.chunks} chunks, not {chunks}")
                return
            missing = (i for i in range(chunks) if i not in up.chunks)
            first = _name_some(missing)
            if first:
                raise Conflict(f"upload {upload_id}: chunks missing: {first}")
            extra = sorted(i for i in up.chunks if i >= chunks)
            if extra:
                raise Conflict(f"upload {upload_id}: chunks beyond {chunks - 1}: {_name_some(extra)}")
            up.preparing = True
            up.busy += 1
        try:
            if self.fsync:
                os.fsync(up.fd)
                fsync_dir(self.staging)
            self._crash_hook("prepare:synced")
        except BaseException as exc:
            with self._lock:
                up.preparing = False
                up.busy -= 1
                self._cond.notify_all()
            if isinstance(exc, OSError):
                _raise_if_full(exc)
            raise
        with self._lock:
            try:
                if up.gone:
                    raise NotFound(f"no upload {upload_id}")
                rows = [up.chunks[i] for i in range(chunks)]
                try:
                    self._db.add_prepared(up.upload, rows, up.size, self.clock())
                except BaseException:
                    up.preparing = False
                    raise
                del self._open[upload_id]
                os.close(up.fd)
            finally:
                up.busy -= 1
                self._cond.notify_all()
        self._crash_hook("prepare:cataloged")

    def commit(self, upload_id: str, meta: Mapping[str, Any]) -> Version:
        """Make a prepared upload a visible version, atomically; a retry returns the same Version."""
        check_upload_id(upload_id)
        meta = json.loads(encode_meta(meta))
        uploaded = False
        if self.blobs.remote:
            done = self._upload_prepared(upload_id)
            if done is not None:
                return done
            uploaded = True
        with self._lock:
            db = self._db
            state = self._state(upload_id)
            name = self._uploaded_name.pop(upload_id, None)
            if uploaded and state is State.NONE and name is not None:  # aborted while its data went up
                self.blobs.delete(name)
            _expect(state, Event.COMMIT, upload_id)
            if state is State.COMMITTED:
                return db.version_of_upload(upload_id)  # type: ignore[return-value]
            p = db.prepared(upload_id)
            if p is None:  # pragma: no cover - state is PREPARED
                raise NotFound(f"no upload {upload_id}")
            u = p.upload
            self._need_bucket(u.bucket)
            repair = self._check_slot(u)
            src = self._staging_path(upload_id)
            if not src.exists():
                db.drop_prepared(upload_id)
                raise NotFound(f"upload {upload_id} lost its staged data")
            old = db.version(u.object_id, u.version) if repair else None
            old_file = db.data_file(u.object_id, u.version) if repair else None
            v = Version(bucket=u.bucket, key=u.key, object_id=u.object_id, version=u.version, x=u.x, k=u.k,
                        n=u.n, chunks=p.chunks, share_bytes=p.size, deleted=False,
                        committed_at=old.committed_at if old else self.clock(), meta=dict(meta))
            with db.txn() as tx:
                if repair:
                    db.delete_version(tx, u.object_id, u.version)
                db.insert_version(tx, v, upload_id)
                tx.execute("DELETE FROM uploads WHERE upload_id = ?", (upload_id,))
            self._crash_hook("commit:cataloged")
            self.blobs.adopt(src, self._blob_name(u.object_id, u.version, upload_id), uploaded=uploaded)
            self._crash_hook("commit:renamed")
            v = db.version_of_upload(upload_id)  # type: ignore[assignment]
        if old_file is not None:
            self.blobs.delete(self._blob_name(u.object_id, u.version, old_file))
        self.blobs.sync()
        return v  # type: ignore[return-value]

    def committed(self, upload_id: str) -> Version | None:
        """The version an upload became, if it is committed (a retried commit gets it again)."""
        check_upload_id(upload_id)
        with self._lock:
            return self._db.version_of_upload(upload_id)

    def _upload_prepared(self, upload_id: str) -> Version | None:
        """Remote blob store: put a prepared upload's data in the bucket before its commit point.

        Returns the Version when the upload is committed already; raises what
        commit would for an upload in the wrong state. Runs outside the lock.
        """
        with self._lock:
            db = self._db
            state = self._state(upload_id)
            _expect(state, Event.COMMIT, upload_id)
            if state is State.COMMITTED:
                return db.version_of_upload(upload_id)
            p = db.prepared(upload_id)
            if p is None:  # pragma: no cover - state is PREPARED
                raise NotFound(f"no upload {upload_id}")
            u = p.upload
            self._need_bucket(u.bucket)
            self._check_slot(u)
            src = self._staging_path(upload_id)
            name = self._blob_name(u.object_id, u.version, upload_id)
            self._uploaded_name[upload_id] = name
        try:
            self.blobs.upload(src, name)
        except FileNotFoundError:
            with self._lock:
                self._uploaded_name.pop(upload_id, None)
                if self._state(upload_id) is State.COMMITTED:  # a concurrent commit moved it
                    return self._db.version_of_upload(upload_id)
            raise NotFound(f"upload {upload_id} lost its staged data") from None
        except BaseException:
            with self._lock:
                self._uploaded_name.pop(upload_id, None)
            raise
        self._crash_hook("commit:uploaded")
        return None

    def abort(self, upload_id: str) -> None:
        """Forget an upload that is not committed, with its staged data; unknown ids are fine."""
        check_upload_id(upload_id)
        with self._lock:
            if upload_id in self._open:
                self._abort_open(upload_id)
            elif self._db.prepared(upload_id) is not None:
                self._abort_prepared(upload_id)

    def _abort_open(self, upload_id: str) -> int:
        """With the lock held: drop an open upload once no thread uses its fd. Returns its size."""
        up = self._open.pop(upload_id, None)
        if up is None:  # another thread got there while we waited
            return 0
        up.gone = True
        self._cond.wait_for(lambda: up.busy == 0)
        os.close(up.fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(up.path)
        return up.size

    def _abort_prepared(self, upload_id: str) -> int:
        p = self._db.prepared(upload_id)
        self._db.drop_prepared(upload_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._staging_path(upload_id))
        return p.size if p else 0

    # -- tombstones and reading the catalog -------------------------------------------

    def tombstone(self, bucket: str, key: str, object_id: bytes, version: int,
                  meta: Mapping[str, Any]) -> Version:
        """Commit a delete marker as version ``version`` of ``bucket/key``; a retry returns it again."""
        check_bucket(bucket)
        check_key(key)
        check_object_id(object_id)
        check_version(version)
        v = Version(bucket=bucket, key=key, object_id=object_id, version=version, x=0, k=0, n=0, chunks=0,
                    share_bytes=0, deleted=True, committed_at=0.0, meta=json.loads(encode_meta(meta)))
        with self._lock:
            db = self._db
            self._need_bucket(bucket)
            have = db.version(object_id, version)
            if have is not None:
                if have.deleted and (have.bucket, have.key, have.meta) == (bucket, key, v.meta):
                    return have
                raise Conflict(f"version {version} of object {object_id.hex()} exists here as something else")
            v = dataclasses.replace(v, committed_at=self.clock())
            with db.txn() as tx:
                db.insert_version(tx, v, None)
            return db.version(object_id, version)  # type: ignore[return-value]

    def versions(self, bucket: str, key: str, limit: int | None = None) -> list[Version]:
        """Committed versions of ``bucket/key`` (tombstones too), newest first by (version, object_id);
        the newest ``limit`` of them when given."""
        check_bucket(bucket)
        check_key(key)
        with self._lock:
            self._need_bucket(bucket)
            return self._db.versions(bucket, key, limit)

    def latest(self, bucket: str, key: str) -> Version | None:
        """The newest committed version, which may be a tombstone; None when there is none."""
        found = self.versions(bucket, key)
        return found[0] if found else None

    def version(self, bucket: str, key: str, object_id: bytes, version: int) -> Version:
        check_bucket(bucket)
        check_key(key)
        check_object_id(object_id)
        check_version(version)
        with self._lock:
            self._need_bucket(bucket)
            v = self._db.version(object_id, version)
        if v is None or (v.bucket, v.key) != (bucket, key):
            raise NoSuchKey(bucket, key)
        return v

    def list(self, bucket: str, *, prefix: str = "", start_after: str = "",
             limit: int = 1000) -> list[Version]:
        """The newest version of each live key, in UTF-8 byte order: what a ListObjects page shows."""
        self._check_listing(bucket, prefix, start_after, limit)
        with self._lock:
            self._need_bucket(bucket)
            return _take(self._db.latest_live(bucket, start_after, prefix), prefix, limit)

    def list_versions(self, bucket: str, *, prefix: str = "", key_marker: str = "", limit: int = 1000,
                      version_marker: tuple[int, bytes] | None = None) -> list[Version]:
        """Every committed version, by key then newest first, of keys after ``key_marker``.

        ``version_marker`` = (version, object_id) continues inside
        ``key_marker``'s own versions (S3's version-id-marker), so a key with
        more than ``limit`` versions can be paged through.
        """
        self._check_listing(bucket, prefix, key_marker, limit)
        marker = None
        if version_marker is not None:
            ver, oid = version_marker
            check_version(ver)
            check_object_id(oid)
            check_key(key_marker)
            marker = (key_marker, ver, oid)
        with self._lock:
            self._need_bucket(bucket)
            return _take(self._db.all_versions(bucket, key_marker, prefix, marker), prefix, limit)

    @staticmethod
    def _check_listing(bucket: str, prefix: str, after: str, limit: int) -> None:
        check_bucket(bucket)
        for name, s in (("prefix", prefix), ("marker", after)):
            if not isinstance(s, str) or "\x00" in s or len(s.encode("utf-8", "surrogatepass")) > 1024:
                raise InvalidName(f"{name} must be a string of at most 1024 bytes without NUL")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise LocalError("limit must be a non-negative integer")

    # -- reading shares ----------------------------------------------------------------

    def _locate(self, v: Version, index: int) -> tuple[str, ChunkRow, Version]:
        if not isinstance(v, Version):
            raise LocalError("read_chunk needs a Version")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise NotFound(f"no chunk {index!r}")
        with self._lock:
            db = self._db
            have = db.version(v.object_id, v.version)
            if have is None or (have.bucket, have.key) != (v.bucket, v.key):
                raise NoSuchKey(v.bucket, v.key)
            upload_id = db.data_file(v.object_id, v.version)
            if upload_id is None:
                raise NotFound(f"{v.bucket}/{v.key} version {v.version} is a delete marker")
            row = db.chunk(upload_id, index)
            if row is None:
                raise NotFound(f"{v.bucket}/{v.key} version {v.version} has no chunk {index}")
            if db.is_bad(upload_id, index):
                raise ShareCorruption(f"chunk {index} of {v.bucket}/{v.key} is known bad on this node")
        return self._blob_name(v.object_id, v.version, upload_id), row, have

    def _read(self, v: Version, index: int, into: memoryview | None) -> tuple[FrameHeader, bytes | int]:
        for attempt in range(2):
            name, row, have = self._locate(v, index)
            if into is not None and len(into) < row.length:
                raise LocalError(f"buffer of {len(into)} bytes is too small for {row.length}")
            try:
                reader = self.blobs.open(name)
                try:
                    if into is None:
                        data: bytes | int = reader.pread(row.length, row.offset)
                        got = len(data)  # type: ignore[arg-type]
                    else:
                        data = got = reader.preadinto(into[: row.length], row.offset)
                finally:
                    reader.close()
            except FileNotFoundError:
                if attempt == 0:  # a repair may have just replaced the file: look again
                    continue
                raise ShareCorruption(f"chunk {index} of {v.bucket}/{v.key}: data file missing") from None
            if got != row.length:
                raise ShareCorruption(f"chunk {index} of {v.bucket}/{v.key}: data file truncated")
            header = FrameHeader(object_id=have.object_id, object_version=have.version, chunk_index=index,
                                 x=have.x, k=have.k, n=have.n, body_length=row.length, digest=row.digest)
            return header, data
        raise AssertionError("unreachable")  # pragma: no cover

    def read_chunk(self, v: Version, index: int) -> tuple[FrameHeader, bytes]:
        """The stored share and its header; the digest is the stored one (the client checks it)."""
        header, data = self._read(v, index, None)
        return header, data  # type: ignore[return-value]

    def read_chunk_into(self, v: Version, index: int, buffer: BytesLike) -> FrameHeader:
        """As :meth:`read_chunk`, into ``buffer[:body_length]`` (no copy of 4 MiB per read)."""
        mv = memoryview(buffer).cast("B")
        if mv.readonly:
            raise LocalError("buffer is read-only")
        header, _ = self._read(v, index, mv)
        return header

    # -- housekeeping ------------------------------------------------------------------

    def gc(self, *, staging_ttl_s: float = 3600, superseded_ttl_s: float = 86400) -> GCReport:
        """Collect stale uploads, long-superseded versions and crash leftovers.

        Never a key's newest version: what a reader may still ask for stays.
        """
        for name, ttl in (("staging_ttl_s", staging_ttl_s), ("superseded_ttl_s", superseded_ttl_s)):
            if not isinstance(ttl, int | float) or isinstance(ttl, bool) or ttl < 0:
                raise LocalError(f"{name} must be a non-negative number")
        now = self.clock()
        stale = stale_bytes = 0
        with self._lock:
            db = self._db
            for upload_id, up in list(self._open.items()):
                if now - up.last_activity > staging_ttl_s:
                    stale_bytes += self._abort_open(upload_id)
                    stale += 1
            for upload_id in db.prepared_before(now - staging_ttl_s):
                stale_bytes += self._abort_prepared(upload_id)
                stale += 1
            old = db.superseded(now - superseded_ttl_s)
            if old:
                with db.txn() as tx:
                    for oid, ver, _, _ in old:
                        db.delete_version(tx, oid, ver)
            moved = self._roll_forward()
        for oid, ver, u, _ in old:  # rows first, durably, then the data
            if u is not None:
                self.blobs.delete(self._blob_name(oid, ver, u))
        orphans, orphan_bytes = self._sweep_orphans()
        return GCReport(stale, stale_bytes, len(old), sum(s for *_, s in old), orphans, orphan_bytes, moved)

    def _sweep_orphans(self) -> tuple[int, int]:
        """Remove data files no upload or version names (what a crash leaves behind)."""
        count = size = 0
        for entry in os.scandir(self.staging):
            m = _STAGING.fullmatch(entry.name)
            if not m:
                continue
            upload_id = m[1]
            with self._lock:
                if upload_id in self._open or self._db.prepared(upload_id) is not None:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    nbytes = entry.stat().st_size
                    os.unlink(entry.path)
                    count, size = count + 1, size + nbytes
        for name, nbytes in list(self.blobs.scan()):
            m = _OBJECT.fullmatch(name)
            if not m:
                continue
            upload_id = m[3]
            with self._lock:
                v = self._db.version_of_upload(upload_id)
                keep = v is not None and (v.object_id.hex(), v.version) == (m[1], int(m[2], 16))
                # A remote commit uploads while its upload is still prepared: not an orphan yet.
                keep = keep or upload_id in self._uploaded_name or (
                    self.blobs.remote and self._db.prepared(upload_id) is not None)
                if keep:
                    continue
                self.blobs.delete(name)
                count, size = count + 1, size + nbytes
        return count, size

    def scrub(self, *, max_bytes: int | None = None) -> ScrubReport:
        """Re-hash stored chunks and flag the rotten ones, so reads refuse them until a repair.

        Without ``max_bytes`` a whole pass from the start; with it, a bounded
        pass that resumes where the previous bounded pass stopped.
        """
        if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool)
                                      or max_bytes < 0):
            raise LocalError("max_bytes must be a non-negative integer or None")
        with self._lock:
            cursor = self._db.scrub_cursor() if max_bytes is not None else None
        checked = nbytes = 0
        bad: list[BadChunk] = []
        marks: list[tuple[str, int, str]] = []
        complete = False
        files: dict[str, BlobReader | None] = {}
        try:
            while True:
                with self._lock:
                    batch = self._db.scrub_batch(cursor, _SCRUB_BATCH)
                consumed = 0
                for upload_id, index, offset, length, digest, bucket, key, oid, ver in batch:
                    if max_bytes is not None and checked and nbytes >= max_bytes:
                        break
                    consumed += 1
                    reason = self._check_chunk(files, upload_id, bytes(oid), ver, offset, length,
                                               bytes(digest))
                    if reason is not None:
                        marks.append((upload_id, index, reason))
                        bad.append(BadChunk(bucket, key, bytes(oid), ver, index, reason))
                    checked, nbytes, cursor = checked + 1, nbytes + length, (upload_id, index)
                if consumed < len(batch):
                    break  # out of budget
                if len(batch) < _SCRUB_BATCH:
                    complete = True
                    break
        finally:
            for reader in files.values():
                if reader is not None:
                    reader.close()
        with self._lock:
            db = self._db
            if marks:
                db.mark_bad(marks, self.clock())
                # A version that gc or a repair replaced meanwhile was not bad, only gone.
                still = {(u, i) for u, i, _ in marks if db.is_bad(u, i)}
                bad = [b for b, (u, i, _) in zip(bad, marks, strict=True) if (u, i) in still]
            if max_bytes is not None:
                db.set_scrub_cursor(None if complete else cursor)
        return ScrubReport(checked, nbytes, tuple(bad), complete)

    def _check_chunk(self, files: dict[str, BlobReader | None], upload_id: str, oid: bytes, ver: int,
                     offset: int, length: int, digest: bytes) -> str | None:
        if upload_id not in files:
            for reader in files.values():  # one data file open at a time: rows come grouped by file
                if reader is not None:
                    reader.close()
            files.clear()
            try:
                files[upload_id] = self.blobs.open(self._blob_name(oid, ver, upload_id))
            except FileNotFoundError:
                files[upload_id] = None
        reader = files[upload_id]
        if reader is None:
            return "data file missing"
        try:
            data = reader.pread(length, offset)
        except FileNotFoundError:
            files[upload_id] = None
            return "data file missing"
        if len(data) != length:
            return "data file truncated"
        if not hmac.compare_digest(hashlib.sha256(data).digest(), digest):
            return "digest mismatch"
        return None

    def stats(self) -> dict[str, int]:
        """Figures for /v1/status: buckets, live objects, versions, bytes, uploads in progress, bad chunks."""
        with self._lock:
            s = self._db.stats()
            open_bytes = sum(up.size for up in self._open.values())
            return {
                "buckets": s["buckets"], "objects": s["objects"], "versions": s["versions"],
                "stored_bytes": s["stored_bytes"],
                "staging_uploads": s["prepared_uploads"] + len(self._open),
                "staging_bytes": s["prepared_bytes"] + open_bytes,
                "bad_chunks": s["bad_chunks"],
            }


def _take(rows: Iterator[Version], prefix: str, limit: int) -> list[Version]:
    """The first ``limit`` rows that start with ``prefix`` (rows come in key order from >= prefix)."""
    out: list[Version] = []
    if limit == 0:
        return out
    for v in rows:
        if not v.key.startswith(prefix):
            break
        out.append(v)
        if len(out) == limit:
            break
    return out
