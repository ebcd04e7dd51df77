"""What a storage node knows, in SQLite (or PostgreSQL): buckets, committed versions, where each chunk lies.

The share bytes themselves live in one data file per version (see
:mod:`nodes.store`); the catalog holds, per data file, one row per chunk
(index, offset, length, SHA-256). A data file is named by the upload that
wrote it, so a repair that rewrites a version gets a new file and new chunk
rows, and the old ones go in the same transaction.

Tables::

    buckets        name, created
    versions       (object_id, version) -> bucket, key, x, k, n, chunks, share_bytes,
                   deleted, committed_at, meta (JSON), upload_id (its data file; NULL for a tombstone)
    uploads        prepared uploads only (open ones live in memory: their data is not yet on disk)
    chunks         (upload_id, idx) -> offset, length, digest: of prepared uploads and of versions
    bad_chunks     (upload_id, idx) -> reason, found_at: what the scrubber found rotten
    scrub_cursor   where a bounded scrub pass stopped

Keys are TEXT under SQLite's BINARY collation, which compares UTF-8 bytes:
listings come out in the byte order of the keys' UTF-8, as S3 lists them.

A large node may keep its catalog in PostgreSQL instead (``catalog =
"postgresql://..."``): one schema per node, held by an advisory lock so that
two nodes never share one, text columns under the "C" collation (byte
order again). The SQL below is written once for both: ``?`` parameters,
``ON CONFLICT`` upserts and a quoted ``"offset"`` column; :class:`_Postgres`
gives psycopg the few calls of sqlite3's connection that the catalog uses.

The records (:class:`Upload`, :class:`Version`, :class:`Bucket`) are frozen
and validate what comes from outside on construction, as h11's events do.
Not thread-safe: :class:`nodes.store.Store` holds its lock around every call.
"""

# Every SQL string here interpolates only the module's own constants (_VCOLS,
# _NEWEST); values always go through ? parameters.
# ruff: noqa: S608

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import sqlite3
import urllib.parse
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qstore.cluster import check_catalog_schema, check_catalog_url
from qstore.errors import LocalError

MAX_KEY_BYTES = 1024
MAX_META_BYTES = 64 * 1024
MAX_VERSION = 2**63 - 1
MAX_CHUNKS = 2**32

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_HEX32 = re.compile(r"[0-9a-f]{32}")


class InvalidName(LocalError):
    """A bucket name, object key or identifier that cannot exist (S3 naming rules, sizes)."""


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_bucket(name: object) -> str:
    """S3's rules: 3-63 of [a-z0-9.-], alphanumeric at both ends, no '..', not an IPv4 address."""
    if not isinstance(name, str) or not _BUCKET.fullmatch(name) or ".." in name:
        raise InvalidName(f"invalid bucket name {name!r}")
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return name
    raise InvalidName(f"invalid bucket name {name!r} (an IP address)")


def check_key(key: object) -> str:
    """1..1024 bytes of UTF-8 without NUL (lone surrogates do not encode, so they are refused)."""
    if not isinstance(key, str) or not key or "\x00" in key:
        raise InvalidName("object key must be a non-empty string without NUL")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidName("object key is not valid Unicode") from None
    if size > MAX_KEY_BYTES:
        raise InvalidName(f"object key is {size} bytes of UTF-8, more than {MAX_KEY_BYTES}")
    return key


def check_object_id(object_id: object) -> bytes:
    if not isinstance(object_id, bytes) or len(object_id) != 16:
        raise InvalidName("object id must be 16 bytes")
    return object_id


def check_version(version: object) -> int:
    if not _is_int(version) or not 0 <= version <= MAX_VERSION:  # type: ignore[operator]
        raise InvalidName(f"version must be an integer in [0, {MAX_VERSION}]")
    return version  # type: ignore[return-value]


def check_upload_id(upload_id: object) -> str:
    if not isinstance(upload_id, str) or not _HEX32.fullmatch(upload_id):
        raise InvalidName("upload id must be 32 lowercase hex digits")
    return upload_id


def check_xkn(x: object, k: object, n: object) -> None:
    if not (_is_int(x) and _is_int(k) and _is_int(n)):
        raise LocalError("x, k and n must be integers")
    if not 2 <= k <= n <= 255:  # type: ignore[operator]
        raise LocalError("need 2 <= k <= n <= 255")
    if not 1 <= x <= n:  # type: ignore[operator]
        raise LocalError("need 1 <= x <= n")


def encode_meta(meta: object) -> str:
    """Strict JSON of an object's metadata, at most 64 KiB, so a client cannot bloat the catalog."""
    if not isinstance(meta, Mapping):
        raise LocalError("meta must be a mapping")
    try:
        text = json.dumps(dict(meta), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise LocalError(f"meta is not JSON-serialisable: {exc}") from None
    if len(text.encode("utf-8")) > MAX_META_BYTES:
        raise LocalError(f"meta is larger than {MAX_META_BYTES} bytes of JSON")
    return text


@dataclass(frozen=True, kw_only=True)
class Upload:
    """One node's part of a put: which version it writes and as which share (x of k-of-n)."""

    upload_id: str
    bucket: str
    key: str
    object_id: bytes
    version: int
    x: int
    k: int
    n: int

    def __post_init__(self) -> None:
        check_upload_id(self.upload_id)
        check_bucket(self.bucket)
        check_key(self.key)
        check_object_id(self.object_id)
        check_version(self.version)
        check_xkn(self.x, self.k, self.n)


@dataclass(frozen=True, kw_only=True)
class Version:
    """A committed version (or tombstone: ``deleted``, no chunks, x = k = n = 0) as this node holds it."""

    bucket: str
    key: str
    object_id: bytes
    version: int
    x: int
    k: int
    n: int
    chunks: int
    share_bytes: int
    deleted: bool
    committed_at: float
    meta: dict[str, Any] = field(hash=False)


@dataclass(frozen=True)
class Bucket:
    name: str
    created: float


@dataclass(frozen=True)
class ChunkRow:
    """Where one chunk of a data file lies, and the digest it had on arrival."""

    index: int
    offset: int
    length: int
    digest: bytes


SCHEMA = """
CREATE TABLE IF NOT EXISTS buckets (
    name TEXT PRIMARY KEY,
    created REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS versions (
    object_id BLOB NOT NULL,
    version INTEGER NOT NULL,
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    x INTEGER NOT NULL, k INTEGER NOT NULL, n INTEGER NOT NULL,
    chunks INTEGER NOT NULL,
    share_bytes INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    committed_at REAL NOT NULL,
    meta TEXT NOT NULL,
    upload_id TEXT,
    PRIMARY KEY (object_id, version)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS versions_by_key ON versions (bucket, key, version DESC, object_id DESC);
CREATE UNIQUE INDEX IF NOT EXISTS versions_by_upload ON versions (upload_id) WHERE upload_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS uploads (
    upload_id TEXT PRIMARY KEY,
    bucket TEXT NOT NULL, key TEXT NOT NULL,
    object_id BLOB NOT NULL, version INTEGER NOT NULL,
    x INTEGER NOT NULL, k INTEGER NOT NULL, n INTEGER NOT NULL,
    chunks INTEGER NOT NULL,
    size INTEGER NOT NULL,
    prepared_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks (
    upload_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    "offset" INTEGER NOT NULL,
    length INTEGER NOT NULL,
    digest BLOB NOT NULL,
    PRIMARY KEY (upload_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bad_chunks (
    upload_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    reason TEXT NOT NULL,
    found_at REAL NOT NULL,
    PRIMARY KEY (upload_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS scrub_cursor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    upload_id TEXT NOT NULL,
    idx INTEGER NOT NULL
);
"""
SCHEMA_VERSION = 1

_VCOLS = "bucket, key, object_id, version, x, k, n, chunks, share_bytes, deleted, committed_at, meta"
_NEWEST = """NOT EXISTS (SELECT 1 FROM versions AS w WHERE w.bucket = v.bucket AND w.key = v.key
              AND (w.version > v.version OR (w.version = v.version AND w.object_id > v.object_id)))"""


def _version(row: tuple[Any, ...]) -> Version:
    b, key, oid, ver, x, k, n, chunks, share_bytes, deleted, committed_at, meta = row
    return Version(bucket=b, key=key, object_id=bytes(oid), version=ver, x=x, k=k, n=n, chunks=chunks,
                   share_bytes=share_bytes, deleted=bool(deleted), committed_at=committed_at,
                   meta=json.loads(meta))


@dataclass(frozen=True)
class PreparedUpload:
    upload: Upload
    chunks: int
    size: int
    prepared_at: float


class Catalog:
    """The SQL half of a node's store; every method is one statement or one transaction.

    ``path``: the SQLite file; ``url``: a PostgreSQL database instead (``schema``
    in it is this node's, made on first use).
    """

    def __init__(self, path: Path, *, fsync: bool = True, url: str | None = None, schema: str | None = None):
        if url is not None:
            self.db: Any = _Postgres(url, schema or "qstore")
            return
        # One connection, used from whichever thread holds the Store's lock.
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit we acknowledge survives power loss; OFF when the caller waived fsync (tests).
        self.db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'OFF'}")
        self.db.execute("PRAGMA foreign_keys=OFF")
        (have,) = self.db.execute("PRAGMA user_version").fetchone()
        if have not in (0, SCHEMA_VERSION):
            raise LocalError(f"catalog schema {have} is newer than this code ({SCHEMA_VERSION})")
        with self.txn():
            for statement in _statements(SCHEMA):
                self.db.execute(statement)
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def txn(self) -> Iterator[Any]:
        """BEGIN IMMEDIATE (SQLite) or BEGIN ... COMMIT, or ROLLBACK on any exception."""
        self.db.execute(self.db.begin if isinstance(self.db, _Postgres) else "BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- buckets -------------------------------------------------------------------

    def add_bucket(self, name: str, created: float) -> bool:
        with self.txn() as db:
            cur = db.execute("INSERT INTO buckets (name, created) VALUES (?, ?) ON CONFLICT DO NOTHING",
                             (name, created))
            return cur.rowcount == 1

    def has_bucket(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM buckets WHERE name = ?", (name,)).fetchone() is not None

    def buckets(self) -> list[Bucket]:
        return [Bucket(n, c) for n, c in self.db.execute("SELECT name, created FROM buckets ORDER BY name")]

    def has_live_object(self, bucket: str) -> bool:
        row = self.db.execute(
            f"SELECT 1 FROM versions AS v WHERE v.bucket = ? AND v.deleted = 0 AND {_NEWEST} LIMIT 1",
            (bucket,)).fetchone()
        return row is not None

    def data_files_of_bucket(self, bucket: str) -> list[str]:
        return [u for (u,) in self.db.execute(
            "SELECT upload_id FROM versions WHERE bucket = ? AND upload_id IS NOT NULL", (bucket,))]

    def drop_bucket(self, bucket: str) -> None:
        """Remove the bucket and every version in it (the caller checked none is live)."""
        with self.txn() as db:
            for u in self.data_files_of_bucket(bucket):
                self._drop_file_rows(db, u)
            db.execute("DELETE FROM versions WHERE bucket = ?", (bucket,))
            db.execute("DELETE FROM buckets WHERE name = ?", (bucket,))

    # -- versions ------------------------------------------------------------------

    def version(self, object_id: bytes, version: int) -> Version | None:
        row = self.db.execute(f"SELECT {_VCOLS} FROM versions WHERE object_id = ? AND version = ?",
                              (object_id, version)).fetchone()
        return _version(row) if row else None

    def data_file(self, object_id: bytes, version: int) -> str | None:
        """The upload id naming this version's data file (None for a tombstone or an unknown version)."""
        row = self.db.execute("SELECT upload_id FROM versions WHERE object_id = ? AND version = ?",
                              (object_id, version)).fetchone()
        return row[0] if row else None

    def version_of_upload(self, upload_id: str) -> Version | None:
        row = self.db.execute(f"SELECT {_VCOLS} FROM versions WHERE upload_id = ?", (upload_id,)).fetchone()
        return _version(row) if row else None

    def versions(self, bucket: str, key: str, limit: int | None = None) -> list[Version]:
        sql = (f"SELECT {_VCOLS} FROM versions WHERE bucket = ? AND key = ? "
               "ORDER BY version DESC, object_id DESC")
        if limit is None:
            return [_version(r) for r in self.db.execute(sql, (bucket, key))]
        return [_version(r) for r in self.db.execute(sql + " LIMIT ?", (bucket, key, limit))]

    def latest_live(self, bucket: str, after: str, at_least: str) -> Iterator[Version]:
        """Newest version of each key > ``after`` and >= ``at_least``, tombstoned keys left out, by key."""
        cur = self.db.execute(
            f"SELECT {_VCOLS} FROM versions AS v WHERE v.bucket = ? AND v.key > ? AND v.key >= ? "
            f"AND {_NEWEST} AND v.deleted = 0 ORDER BY v.key", (bucket, after, at_least))
        for row in cur:
            yield _version(row)

    def all_versions(self, bucket: str, after: str, at_least: str,
                     marker: tuple[str, int, bytes] | None) -> Iterator[Version]:
        """Every version of keys > ``after`` (and >= ``at_least``), by key then newest first.

        With ``marker`` = (key, version, object_id), the listing starts with
        that key's versions older than the marker, then the keys after it.
        """
        if marker is not None:
            key, ver, oid = marker
            cur = self.db.execute(
                f"SELECT {_VCOLS} FROM versions WHERE bucket = ? AND key = ? AND key >= ? "
                f"AND (version < ? OR (version = ? AND object_id < ?)) ORDER BY version DESC, object_id DESC",
                (bucket, key, at_least, ver, ver, oid))
            for row in cur.fetchall():
                yield _version(row)
        cur = self.db.execute(
            f"SELECT {_VCOLS} FROM versions WHERE bucket = ? AND key > ? AND key >= ? "
            f"ORDER BY key, version DESC, object_id DESC", (bucket, after, at_least))
        for row in cur:
            yield _version(row)

    def insert_version(self, db: Any, v: Version, upload_id: str | None) -> None:
        db.execute(
            f"INSERT INTO versions ({_VCOLS}, upload_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (v.bucket, v.key, v.object_id, v.version, v.x, v.k, v.n, v.chunks, v.share_bytes,
             int(v.deleted), v.committed_at, encode_meta(v.meta), upload_id))

    def delete_version(self, db: Any, object_id: bytes, version: int) -> None:
        """Remove a version's row and its data file's rows (the file itself is the caller's)."""
        row = db.execute("SELECT upload_id FROM versions WHERE object_id = ? AND version = ?",
                         (object_id, version)).fetchone()
        if row and row[0]:
            self._drop_file_rows(db, row[0])
        db.execute("DELETE FROM versions WHERE object_id = ? AND version = ?", (object_id, version))

    @staticmethod
    def _drop_file_rows(db: Any, upload_id: str) -> None:
        db.execute("DELETE FROM chunks WHERE upload_id = ?", (upload_id,))
        db.execute("DELETE FROM bad_chunks WHERE upload_id = ?", (upload_id,))

    def superseded(self, before: float) -> list[tuple[bytes, int, str | None, int]]:
        """(object_id, version, upload_id, share_bytes) of versions a newer one superseded before ``before``.

        A version is superseded from the earliest commit of any newer version
        of its key; the newest version of a key never is.
        """
        return [(bytes(o), v, u, s) for o, v, u, s, _ in self.db.execute(
            """SELECT object_id, version, upload_id, share_bytes, since FROM (
                 SELECT object_id, version, upload_id, share_bytes,
                        MIN(committed_at) OVER (PARTITION BY bucket, key ORDER BY version DESC, object_id DESC
                                                ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS since
                 FROM versions) AS s
               WHERE since IS NOT NULL AND since < ?""", (before,))]

    # -- uploads and chunks --------------------------------------------------------

    def prepared(self, upload_id: str) -> PreparedUpload | None:
        row = self.db.execute(
            "SELECT upload_id, bucket, key, object_id, version, x, k, n, chunks, size, prepared_at "
            "FROM uploads WHERE upload_id = ?", (upload_id,)).fetchone()
        if row is None:
            return None
        u, b, key, oid, ver, x, k, n, chunks, size, at = row
        up = Upload(upload_id=u, bucket=b, key=key, object_id=bytes(oid), version=ver, x=x, k=k, n=n)
        return PreparedUpload(up, chunks, size, at)

    def prepared_before(self, before: float) -> list[str]:
        rows = self.db.execute("SELECT upload_id FROM uploads WHERE prepared_at < ?", (before,))
        return [u for (u,) in rows]

    def add_prepared(self, up: Upload, rows: list[ChunkRow], size: int, at: float) -> None:
        with self.txn() as db:
            db.execute("INSERT INTO uploads VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (up.upload_id, up.bucket, up.key, up.object_id, up.version, up.x, up.k, up.n,
                        len(rows), size, at))
            db.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?, ?)",
                           [(up.upload_id, r.index, r.offset, r.length, r.digest) for r in rows])

    def drop_prepared(self, upload_id: str) -> None:
        with self.txn() as db:
            db.execute("DELETE FROM uploads WHERE upload_id = ?", (upload_id,))
            self._drop_file_rows(db, upload_id)

    def chunk(self, upload_id: str, index: int) -> ChunkRow | None:
        row = self.db.execute(
            'SELECT idx, "offset", length, digest FROM chunks WHERE upload_id = ? AND idx = ?',
            (upload_id, index)).fetchone()
        return ChunkRow(row[0], row[1], row[2], bytes(row[3])) if row else None

    def chunk_digest(self, upload_id: str, index: int) -> bytes | None:
        row = self.db.execute("SELECT digest FROM chunks WHERE upload_id = ? AND idx = ?",
                              (upload_id, index)).fetchone()
        return bytes(row[0]) if row else None

    # -- bad chunks and scrubbing --------------------------------------------------

    def is_bad(self, upload_id: str, index: int) -> bool:
        return self.db.execute("SELECT 1 FROM bad_chunks WHERE upload_id = ? AND idx = ?",
                               (upload_id, index)).fetchone() is not None

    def has_bad(self, upload_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM bad_chunks WHERE upload_id = ? LIMIT 1",
                               (upload_id,)).fetchone() is not None

    def mark_bad(self, marks: list[tuple[str, int, str]], at: float) -> None:
        """Record (upload_id, index, reason) of chunks whose file is still a version's data file."""
        with self.txn() as db:
            for upload_id, index, reason in marks:
                db.execute("INSERT INTO bad_chunks SELECT ?, ?, ?, ? "
                           "WHERE EXISTS (SELECT 1 FROM versions WHERE upload_id = ?) ON CONFLICT DO NOTHING",
                           (upload_id, index, reason, at, upload_id))

    def scrub_batch(self, after: tuple[str, int] | None, limit: int) -> list[tuple[Any, ...]]:
        """Committed chunks after ``after`` in (upload_id, index) order, with their version's names."""
        u, i = after if after is not None else ("", -1)
        return self.db.execute(
            'SELECT c.upload_id, c.idx, c."offset", c.length, c.digest, '
            "v.bucket, v.key, v.object_id, v.version "
            "FROM chunks AS c JOIN versions AS v ON v.upload_id = c.upload_id "
            "WHERE c.upload_id > ? OR (c.upload_id = ? AND c.idx > ?) ORDER BY c.upload_id, c.idx LIMIT ?",
            (u, u, i, limit)).fetchall()

    def scrub_cursor(self) -> tuple[str, int] | None:
        row = self.db.execute("SELECT upload_id, idx FROM scrub_cursor WHERE id = 1").fetchone()
        return (row[0], row[1]) if row else None

    def set_scrub_cursor(self, at: tuple[str, int] | None) -> None:
        with self.txn() as db:
            if at is None:
                db.execute("DELETE FROM scrub_cursor")
            else:
                db.execute("INSERT INTO scrub_cursor (id, upload_id, idx) VALUES (1, ?, ?) ON CONFLICT (id) "
                           "DO UPDATE SET upload_id = excluded.upload_id, idx = excluded.idx", at)

    # -- figures -------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        one = self.db.execute
        return {
            "buckets": one("SELECT COUNT(*) FROM buckets").fetchone()[0],
            "objects": one(f"SELECT COUNT(*) FROM versions AS v WHERE v.deleted = 0 AND {_NEWEST}")
            .fetchone()[0],
            "versions": one("SELECT COUNT(*) FROM versions").fetchone()[0],
            "stored_bytes": int(one("SELECT COALESCE(SUM(share_bytes), 0) FROM versions").fetchone()[0]),
            "prepared_uploads": one("SELECT COUNT(*) FROM uploads").fetchone()[0],
            "prepared_bytes": int(one("SELECT COALESCE(SUM(size), 0) FROM uploads").fetchone()[0]),
            "bad_chunks": one("SELECT COUNT(*) FROM bad_chunks").fetchone()[0],
        }


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


# -- PostgreSQL ----------------------------------------------------------------------------------

def catalog_schema_for(sae_id: str) -> str:
    """The default schema of a node's catalog: ``qstore_`` and its SAE ID in lower case, ``_`` for others."""
    return ("qstore_" + re.sub(r"[^a-z0-9_]", "_", sae_id.lower()))[:63]


def _pg_schema() -> list[str]:
    out = []
    for statement in _statements(SCHEMA):
        statement = statement.replace(" WITHOUT ROWID", "").replace("BLOB", "BYTEA")
        statement = statement.replace("REAL", "DOUBLE PRECISION").replace("INTEGER", "BIGINT")
        out.append(re.sub(r"\bTEXT\b", 'TEXT COLLATE "C"', statement))
    return out


class _Postgres:
    """psycopg, answering the calls the catalog makes of sqlite3's connection: execute, executemany, close."""

    begin = "BEGIN"

    def __init__(self, url: str, schema: str):
        try:
            import psycopg
        except ImportError:
            raise LocalError("a PostgreSQL catalog needs psycopg (pip install 'psycopg[binary]')") from None
        check_catalog_url(url)
        check_catalog_schema(schema)
        self.where = _redacted(url)
        try:
            self.conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise LocalError(f"catalog {self.where}: cannot connect ({_first_line(exc)})") from None
        try:
            # a node holds its schema for as long as it runs: a second node on it would corrupt both
            (mine,) = self.conn.execute("SELECT pg_try_advisory_lock(%s, %s)",
                                        (_LOCK_CLASS, zlib.crc32(schema.encode()) - 2**31)).fetchone()
            if not mine:
                raise LocalError(f"catalog {self.where} schema {schema} is in use by another store")
            self.conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            self.conn.execute(f'SET search_path TO "{schema}"')
            with self.conn.transaction():
                self.conn.execute("CREATE TABLE IF NOT EXISTS catalog_version (id INTEGER PRIMARY KEY "
                                  "CHECK (id = 1), version INTEGER NOT NULL)")
                row = self.conn.execute("SELECT version FROM catalog_version FOR UPDATE").fetchone()
                if row is not None and row[0] != SCHEMA_VERSION:
                    raise LocalError(f"catalog schema {row[0]} is newer than this code ({SCHEMA_VERSION})")
                for statement in _pg_schema():
                    self.conn.execute(statement)
                if row is None:
                    self.conn.execute("INSERT INTO catalog_version VALUES (1, %s)", (SCHEMA_VERSION,))
        except BaseException:
            self.conn.close()
            raise

    def execute(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> Any:
        return self.conn.execute(sql.replace("?", "%s"), params)

    def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), rows)

    def close(self) -> None:
        self.conn.close()


_LOCK_CLASS = 0x7153  # "qS": the advisory-lock class of catalog schemas


def _redacted(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(query="", fragment=""))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
