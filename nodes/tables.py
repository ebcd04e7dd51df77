"""What a node holds of secret-shared tables: column shares on disk, schemas, grants and the audit log.

A table is uploaded like an object version: staged column by column (each
column's shares written in row order into a staging file), and made
visible only by ``commit``, which checks that every column is complete,
fsyncs, and moves the staging directory into place in one rename. A crash
before that leaves only staging, which :meth:`TableStore.gc` removes.

Layout under the node's data directory::

    tables.sqlite            catalog: tables, grants, audit
    tables/<table_id>/<i>    shares of stored column i (field elements, 16 bytes each, row order)
    table-staging/<upload_id>/<i>

The schema, owner and row count are public (every node and the table's
analysts see them); the column files hold only this node's shares.
Not thread-safe: callers serialise (the service runs calls in one worker
thread at a time per store through :meth:`locked`).
"""

# SQL strings interpolate nothing; values always go through ? parameters.

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nodes.blobs import fsync_dir
from qstore import field as F
from qstore.errors import Conflict, Forbidden, LocalError, NoSuchTable, NotFound, RemoteError

MAX_ROWS = 10**7
MAX_COLUMNS = 4096
MAX_SCHEMA_BYTES = 1 << 20
_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,62}")
_SAE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_HEX32 = re.compile(r"[0-9a-f]{32}")

_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS tables (
    name TEXT PRIMARY KEY, table_id TEXT NOT NULL UNIQUE, owner TEXT NOT NULL, schema TEXT NOT NULL,
    columns TEXT NOT NULL, rows INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS grants (
    name TEXT NOT NULL, analyst TEXT NOT NULL, granted_by TEXT NOT NULL, granted_at REAL NOT NULL,
    PRIMARY KEY (name, analyst));
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, query_id TEXT NOT NULL, at REAL NOT NULL, analyst TEXT NOT NULL,
    tables TEXT NOT NULL, query TEXT NOT NULL, status TEXT NOT NULL, revealed TEXT NOT NULL,
    finished REAL, key_spent INTEGER NOT NULL DEFAULT 0);
"""


def check_table_name(name: object) -> str:
    """1-63 of [A-Za-z0-9_.-], starting with a letter or underscore."""
    if not isinstance(name, str) or not _TABLE.fullmatch(name):
        raise RemoteError(f"invalid table name {name!r}: 1-63 of A-Z a-z 0-9 _ . -, starting with a letter")
    return name


def check_sae(name: object) -> str:
    if not isinstance(name, str) or not _SAE.fullmatch(name):
        raise RemoteError(f"invalid SAE ID {name!r}")
    return name


@dataclass(frozen=True, kw_only=True)
class TableInfo:
    """A committed table as every node records it (all public)."""

    name: str
    table_id: str
    owner: str
    schema: Mapping[str, Any]
    columns: tuple[str, ...]  # stored column names, in file order
    rows: int
    created: float
    grants: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "owner": self.owner, "schema": self.schema, "columns": list(self.columns),
                "rows": self.rows, "created": self.created, "grants": list(self.grants)}

    def may_query(self, caller: str) -> bool:
        return caller == self.owner or caller in self.grants


@dataclass(frozen=True, kw_only=True)
class TableUpload:
    """The start of a table upload, checked on construction (it comes from a client)."""

    upload_id: str
    name: str
    owner: str
    schema: Mapping[str, Any]
    columns: tuple[str, ...]
    rows: int

    def __post_init__(self) -> None:
        if not isinstance(self.upload_id, str) or not _HEX32.fullmatch(self.upload_id):
            raise RemoteError("upload_id must be 32 lowercase hex digits")
        check_table_name(self.name)
        check_sae(self.owner)
        if not isinstance(self.schema, Mapping) or len(json.dumps(self.schema)) > MAX_SCHEMA_BYTES:
            raise RemoteError("schema must be a JSON object of at most 1 MiB")
        cols = self.columns
        names_ok = isinstance(cols, tuple) and all(isinstance(c, str) and 0 < len(c) <= 256 for c in cols)
        if not names_ok or not 1 <= len(cols) <= MAX_COLUMNS or len(set(cols)) != len(cols):
            raise RemoteError(f"columns must be 1..{MAX_COLUMNS} distinct names")
        if isinstance(self.rows, bool) or not isinstance(self.rows, int) or not 0 <= self.rows <= MAX_ROWS:
            raise RemoteError(f"rows must be an integer in [0, {MAX_ROWS}]")


@dataclass
class _Staged:
    upload: TableUpload
    directory: Path
    filled: list[int]  # rows written per column
    started: float
    files: dict[int, Any] = field(default_factory=dict)


class TableStore:
    """Tables of one node: staging, commit, catalog, grants, audit log."""

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True,
                 clock: Callable[[], float] = time.time):
        self.root = Path(root)
        self.fsync = fsync
        self.clock = clock
        self._dir = self.root / "tables"
        self._staging = self.root / "table-staging"
        self._dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._staging, ignore_errors=True)  # open uploads do not survive a restart
        self._staging.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.root / "tables.sqlite", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA_SQL)
        self._lock = threading.RLock()
        self._open: dict[str, _Staged] = {}

    def close(self) -> None:
        with self._lock:
            for upload_id in list(self._open):
                self._discard(upload_id)
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- upload ---------------------------------------------------------------------------

    def begin(self, upload: TableUpload) -> None:
        with self._lock:
            if upload.upload_id in self._open:
                if self._open[upload.upload_id].upload != upload:
                    raise Conflict("this upload was begun with other parameters")
                return
            if self._find(upload.name) is not None:
                raise Conflict(f"table {upload.name!r} exists (remove it first)")
            directory = self._staging / upload.upload_id
            directory.mkdir()
            self._open[upload.upload_id] = _Staged(upload, directory, [0] * len(upload.columns), self.clock())

    def _staged(self, upload_id: str) -> _Staged:
        staged = self._open.get(upload_id)
        if staged is None:
            raise NotFound("no such table upload (expired, or never begun)")
        return staged

    def write(self, upload_id: str, caller: str, column: int, row: int, shares: bytes) -> None:
        """Append shares of rows ``row ..`` of stored column ``column`` (in order, no gaps)."""
        with self._lock:
            staged = self._staged(upload_id)
            if caller != staged.upload.owner:
                raise Forbidden("only the uploader may write to this upload")
            if not 0 <= column < len(staged.upload.columns):
                raise RemoteError("column index out of range")
            if row != staged.filled[column]:
                raise Conflict(f"column part starts at row {row}, expected {staged.filled[column]}")
            count = len(shares) // F.ELEM_BYTES
            if count * F.ELEM_BYTES != len(shares) or row + count > staged.upload.rows:
                raise RemoteError("column part has the wrong length")
            F.from_bytes(shares)  # every element reduced: garbage never reaches the disk
            fh = staged.files.get(column)
            if fh is None:
                fh = staged.files[column] = open(staged.directory / str(column), "wb")  # noqa: SIM115
            fh.write(shares)
            staged.filled[column] += count

    def commit(self, upload_id: str, caller: str) -> TableInfo:
        with self._lock:
            staged = self._staged(upload_id)
            up = staged.upload
            if caller != up.owner:
                raise Forbidden("only the uploader may commit this upload")
            missing = [up.columns[i] for i, n in enumerate(staged.filled) if n != up.rows]
            if missing:
                raise RemoteError(f"columns incomplete: {', '.join(missing[:5])}")
            for i in range(len(up.columns)):
                fh = staged.files.pop(i, None)
                if fh is None:
                    (staged.directory / str(i)).touch()  # zero rows
                    continue
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
                fh.close()
            table_id = upload_id
            target = self._dir / table_id
            with self._tx() as db:
                if db.execute("SELECT 1 FROM tables WHERE name = ?", (up.name,)).fetchone():
                    raise Conflict(f"table {up.name!r} exists (remove it first)")
                os.replace(staged.directory, target)
                if self.fsync:
                    fsync_dir(self._dir)
                created = self.clock()
                db.execute("INSERT INTO tables VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (up.name, table_id, up.owner, json.dumps(dict(up.schema)), json.dumps(up.columns),
                            up.rows, created))
            del self._open[upload_id]
            return TableInfo(name=up.name, table_id=table_id, owner=up.owner, schema=up.schema,
                             columns=up.columns, rows=up.rows, created=created)

    def abort(self, upload_id: str, caller: str) -> None:
        with self._lock:
            staged = self._open.get(upload_id)
            if staged is None:
                return
            if caller != staged.upload.owner:
                raise Forbidden("only the uploader may abort this upload")
            self._discard(upload_id)

    def _discard(self, upload_id: str) -> None:
        staged = self._open.pop(upload_id)
        for fh in staged.files.values():
            fh.close()
        shutil.rmtree(staged.directory, ignore_errors=True)

    def gc(self, ttl_s: float) -> int:
        """Drop uploads open longer than ``ttl_s``; how many."""
        with self._lock:
            old = [u for u, s in self._open.items() if self.clock() - s.started > ttl_s]
            for upload_id in old:
                self._discard(upload_id)
            return len(old)

    # -- catalog --------------------------------------------------------------------------

    def _find(self, name: str) -> TableInfo | None:
        row = self._db.execute("SELECT name, table_id, owner, schema, columns, rows, created FROM tables "
                               "WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        grants = tuple(a for (a,) in self._db.execute(
            "SELECT analyst FROM grants WHERE name = ? ORDER BY analyst", (name,)))
        return TableInfo(name=row[0], table_id=row[1], owner=row[2], schema=json.loads(row[3]),
                         columns=tuple(json.loads(row[4])), rows=row[5], created=row[6], grants=grants)

    def get(self, name: str) -> TableInfo:
        with self._lock:
            info = self._find(check_table_name(name))
        if info is None:
            raise NoSuchTable(name)
        return info

    def list(self) -> list[TableInfo]:
        with self._lock:
            names = [n for (n,) in self._db.execute("SELECT name FROM tables ORDER BY name")]
            return [info for n in names if (info := self._find(n)) is not None]

    def drop(self, name: str, caller: str) -> None:
        with self._lock:
            info = self.get(name)
            if caller != info.owner:
                raise Forbidden(f"only {info.owner} may remove table {name!r}")
            with self._tx() as db:
                db.execute("DELETE FROM tables WHERE name = ?", (name,))
                db.execute("DELETE FROM grants WHERE name = ?", (name,))
            shutil.rmtree(self._dir / info.table_id, ignore_errors=True)

    def grant(self, name: str, caller: str, analyst: str, *, revoke: bool = False) -> TableInfo:
        with self._lock:
            info = self.get(name)
            check_sae(analyst)
            if caller != info.owner:
                raise Forbidden(f"only {info.owner} may grant or revoke rights on table {name!r}")
            with self._tx() as db:
                if revoke:
                    db.execute("DELETE FROM grants WHERE name = ? AND analyst = ?", (name, analyst))
                else:
                    db.execute("INSERT OR IGNORE INTO grants VALUES (?, ?, ?, ?)",
                               (name, analyst, caller, self.clock()))
            return self.get(name)

    def load(self, info: TableInfo, columns: list[str]) -> dict[str, F.Vec]:
        """This node's shares of the named stored columns (each (rows, 2))."""
        out = {}
        for name in columns:
            try:
                i = info.columns.index(name)
            except ValueError:
                raise RemoteError(f"table {info.name!r} has no stored column {name!r}") from None
            raw = np.fromfile(self._dir / info.table_id / str(i), dtype="<u8")
            if raw.size != 2 * info.rows:
                raise RemoteError(f"table {info.name!r}: column {name!r} is damaged on this node")
            out[name] = raw.reshape(info.rows, 2).astype(np.uint64, copy=False)
        return out

    # -- audit ----------------------------------------------------------------------------

    def audit_start(self, query_id: str, analyst: str, tables: list[str], query: Mapping[str, Any],
                    revealed: list[str]) -> int:
        with self._lock, self._tx() as db:
            cur = db.execute("INSERT INTO audit (query_id, at, analyst, tables, query, status, revealed) "
                             "VALUES (?, ?, ?, ?, ?, 'running', ?)",
                             (query_id, self.clock(), analyst, json.dumps(tables), json.dumps(dict(query)),
                              json.dumps(revealed)))
            return int(cur.lastrowid or 0)

    def audit_end(self, entry: int, status: str, key_spent: int) -> None:
        with self._lock, self._tx() as db:
            db.execute("UPDATE audit SET status = ?, finished = ?, key_spent = ? WHERE id = ?",
                       (status[:500], self.clock(), key_spent, entry))

    def audit_log(self, limit: int = 100) -> list[dict[str, Any]]:
        if not 1 <= limit <= 10000:
            raise LocalError("limit must be 1..10000")
        with self._lock:
            rows = self._db.execute("SELECT id, query_id, at, analyst, tables, query, status, revealed, "
                                    "finished, key_spent FROM audit ORDER BY id DESC LIMIT ?",
                                    (limit,)).fetchall()
        return [{"id": r[0], "query_id": r[1], "at": r[2], "analyst": r[3], "tables": json.loads(r[4]),
                 "query": json.loads(r[5]), "status": r[6], "revealed": json.loads(r[7]), "finished": r[8],
                 "key_spent_bytes": r[9]} for r in rows]
