"""The node's share store: uploads, idempotency, listings, crash images, gc, scrub and repair."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import uuid
from pathlib import Path

import pytest
from helpers import Clock
from hypothesis import given, settings
from hypothesis import strategies as st

from nodes import store as store_mod
from nodes.store import TRANSITIONS, InvalidName, State, Store, Upload, Version
from qstore.errors import (
    BucketNotEmpty,
    Conflict,
    FrameError,
    LocalError,
    NoSuchBucket,
    NoSuchKey,
    NotFound,
    ShareCorruption,
)
from qstore.framing import FrameHeader, encode_frame, parse_frame

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.t = 1_000_000.0
    return c


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path: Path, clock: Clock):
    """A store on each catalog: SQLite in its directory (the default), and a schema of a PostgreSQL server."""
    pg = {}
    if request.param == "postgres":
        pg = {"catalog_url": request.getfixturevalue("postgres_url"),
              "catalog_schema": f"t_{uuid.uuid4().hex[:12]}"}
    with Store(tmp_path / "node", clock=clock, fsync=False, **pg) as s:
        s.create_bucket("bkt")
        yield s


def upload(key: str = "k", *, version: int = 1, object_id: bytes | None = None, bucket: str = "bkt",
           x: int = 1, k: int = 2, n: int = 3) -> Upload:
    return Upload(upload_id=uuid.uuid4().hex, bucket=bucket, key=key,
                  object_id=object_id or uuid.uuid4().bytes, version=version, x=x, k=k, n=n)


def frame(up: Upload, index: int, body: bytes) -> tuple[FrameHeader, bytes]:
    f = parse_frame(encode_frame(object_id=up.object_id, object_version=up.version, chunk_index=index,
                                 x=up.x, k=up.k, n=up.n, body=body))
    return f.header, f.body


def bodies(count: int, size: int = 100, seed: int = 0) -> list[bytes]:
    return [hashlib.sha256(f"{seed}/{i}".encode()).digest() * (size // 32) + bytes([i % 256]) * (size % 32)
            for i in range(count)]


def stage(s: Store, up: Upload, chunks: list[bytes]) -> None:
    s.begin(up)
    for i, body in enumerate(chunks):
        s.write_chunk(up.upload_id, *frame(up, i, body))


def put(s: Store, up: Upload, chunks: list[bytes], meta: dict | None = None) -> Version:
    stage(s, up, chunks)
    s.prepare(up.upload_id, chunks=len(chunks))
    return s.commit(up.upload_id, meta if meta is not None else {"size": sum(map(len, chunks))})


def files_under(root: Path, sub: str) -> list[str]:
    return sorted(p.name for p in (root / sub).iterdir())


# -- round trip ----------------------------------------------------------------------


def test_round_trip(store: Store, clock: Clock):
    up = upload("dir/file.bin", version=7, x=2, k=3, n=5)
    data = bodies(3, 1000) + [b""]
    v = put(store, up, data, {"size": 3000, "user": {"colour": "blue"}})
    assert (v.bucket, v.key, v.object_id, v.version, v.x, v.k, v.n) == ("bkt", "dir/file.bin", up.object_id,
                                                                        7, 2, 3, 5)
    assert (v.chunks, v.share_bytes, v.deleted, v.committed_at) == (4, 3000, False, clock.t)
    assert v.meta == {"size": 3000, "user": {"colour": "blue"}}
    assert store.versions("bkt", "dir/file.bin") == [v]
    assert store.latest("bkt", "dir/file.bin") == v
    assert store.version("bkt", "dir/file.bin", up.object_id, 7) == v
    for i, body in enumerate(data):
        header, got = store.read_chunk(v, i)
        assert got == body
        assert header == frame(up, i, body)[0]  # digest as stored, fields from the catalog
        buf = bytearray(2000)
        assert store.read_chunk_into(v, i, buf) == header
        assert bytes(buf[: len(body)]) == body
    with pytest.raises(NotFound):
        store.read_chunk(v, 4)
    assert store.stats() == {"buckets": 1, "objects": 1, "versions": 1, "stored_bytes": 3000,
                             "staging_uploads": 0, "staging_bytes": 0, "bad_chunks": 0}
    assert files_under(store.root, "staging") == []
    assert len(files_under(store.root, "objects")) == 1


def test_data_persists_across_reopen(tmp_path: Path):
    with Store(tmp_path, fsync=True) as s:
        s.create_bucket("bkt")
        v = put(s, upload(), bodies(2))
    with Store(tmp_path) as s:
        assert s.versions("bkt", "k") == [v]
        assert s.read_chunk(v, 1)[1] == bodies(2)[1]


def test_one_store_per_directory(tmp_path: Path):
    with Store(tmp_path, fsync=False), pytest.raises(LocalError, match="in use"):
        Store(tmp_path, fsync=False)
    s = Store(tmp_path, fsync=False)
    s.close()
    s.close()
    with pytest.raises(LocalError, match="closed"):
        s.buckets()


# -- validation ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ab", "a" * 64, "Abc", "-abc", "abc-", "a..b", "a_b", "192.168.1.1", "", 7])
def test_bad_bucket_names_are_refused(store: Store, name):
    with pytest.raises(InvalidName):
        store.create_bucket(name)


def test_good_bucket_names(store: Store):
    for name in ("abc", "a" * 63, "my.bucket-1", "1.2.3"):
        assert store.create_bucket(name) is True
    assert [b.name for b in store.buckets()] == sorted(["1.2.3", "a" * 63, "abc", "bkt", "my.bucket-1"])


@pytest.mark.parametrize("key", ["", "a\x00b", "é" * 513, "\ud800", b"bytes"])
def test_bad_keys_are_refused(store: Store, key):
    with pytest.raises(InvalidName):
        store.versions("bkt", key)
    with pytest.raises(InvalidName):
        upload(key)


def test_upload_fields_are_validated():
    good = {"upload_id": "0" * 32, "bucket": "bkt", "key": "k", "object_id": bytes(16), "version": 0,
            "x": 1, "k": 2, "n": 2}
    Upload(**good)
    Upload(**{**good, "key": "é" * 512, "version": 2**63 - 1, "x": 255, "k": 255, "n": 255})
    for bad in ({"upload_id": "0" * 31}, {"upload_id": "A" * 32}, {"upload_id": "../" + "0" * 29},
                {"object_id": bytes(15)}, {"version": -1}, {"version": 2**63}, {"version": True},
                {"x": 0}, {"x": 3}, {"k": 1}, {"k": 3}, {"n": 256, "x": 1, "k": 2}):
        with pytest.raises(LocalError):
            Upload(**{**good, **bad})


def test_paths_never_come_from_names(request, store: Store):
    """Hostile keys land in the catalog only: every file on disk is named by hex identifiers."""
    for i, key in enumerate(["../../escape", "/etc/passwd", "a/../../b", "..", "con", "x" * 1024]):
        put(store, upload(key, version=i), bodies(1))
    store.begin(upload("../staged"))
    names = files_under(store.root, "objects") + files_under(store.root, "staging")
    assert len(names) == 7
    assert all(re.fullmatch(r"[0-9a-f]{32}(-[0-9a-f]{16}-[0-9a-f]{32}\.shares|\.part)", n) for n in names)
    sqlite = ["catalog.sqlite3", "catalog.sqlite3-shm", "catalog.sqlite3-wal"]
    on_sqlite = request.node.callspec.params["store"] == "sqlite"
    assert sorted(p.name for p in store.root.iterdir()) == [*(sqlite if on_sqlite else []), "lock", "objects",
                                                            "staging"]
    with pytest.raises(InvalidName):
        store.abort("../../catalog.sqlite3" + "0" * 11)


# -- idempotency and conflicts -------------------------------------------------------------


def test_begin_rules(store: Store):
    up = upload()
    with pytest.raises(NoSuchBucket):
        store.begin(upload(bucket="nope"))
    store.begin(up)
    store.begin(up)  # a retry
    with pytest.raises(Conflict):
        store.begin(Upload(**{**up.__dict__, "key": "other"}))
    for i, body in enumerate(bodies(2)):
        store.write_chunk(up.upload_id, *frame(up, i, body))
    store.prepare(up.upload_id, chunks=2)
    store.begin(up)  # still a retry once prepared
    store.commit(up.upload_id, {})
    with pytest.raises(Conflict):
        store.begin(up)  # its id is used
    with pytest.raises(Conflict, match="already committed"):
        store.begin(Upload(**{**up.__dict__, "upload_id": uuid.uuid4().hex}))  # same version, healthy here
    # another upload of the same (object_id, version) may run, but cannot commit over a good copy
    same = Upload(**{**up.__dict__, "upload_id": uuid.uuid4().hex, "version": 2})
    twin = Upload(**{**same.__dict__, "upload_id": uuid.uuid4().hex})
    stage(store, same, bodies(1))
    stage(store, twin, bodies(1))
    store.prepare(same.upload_id, chunks=1)
    store.prepare(twin.upload_id, chunks=1)
    store.commit(same.upload_id, {})
    with pytest.raises(Conflict):
        store.commit(twin.upload_id, {})


def test_write_chunk_rules(store: Store):
    up = upload()
    store.begin(up)
    header, body = frame(up, 0, b"share zero")
    with pytest.raises(ShareCorruption, match="digest"):
        store.write_chunk(up.upload_id, header, b"share zerO")
    with pytest.raises(ShareCorruption, match="bytes"):
        store.write_chunk(up.upload_id, header, body + b"!")
    other = upload()
    with pytest.raises(FrameError):
        store.write_chunk(up.upload_id, *frame(other, 0, body))
    with pytest.raises(FrameError):
        store.write_chunk(up.upload_id, *frame(Upload(**{**up.__dict__, "x": 2}), 0, body))
    store.write_chunk(up.upload_id, header, body)
    store.write_chunk(up.upload_id, header, bytearray(body))  # a retry: no-op
    with pytest.raises(Conflict, match="other content"):
        store.write_chunk(up.upload_id, *frame(up, 0, b"different"))
    with pytest.raises(NotFound):
        store.write_chunk(uuid.uuid4().hex, header, body)
    store.prepare(up.upload_id, chunks=1)
    store.write_chunk(up.upload_id, header, body)  # a late retry after prepare is still fine
    with pytest.raises(Conflict, match="prepared"):
        store.write_chunk(up.upload_id, *frame(up, 1, body))
    store.commit(up.upload_id, {})
    with pytest.raises(NotFound):
        store.write_chunk(up.upload_id, header, body)
    gone = upload()
    store.begin(gone)
    store.abort(gone.upload_id)
    with pytest.raises(NotFound):
        store.write_chunk(gone.upload_id, *frame(gone, 0, body))
    assert store.stats()["staging_uploads"] == 0


def test_prepare_and_commit_rules(store: Store):
    up = upload()
    stage(store, up, bodies(5))
    store.abort(up.upload_id)
    up = upload()
    store.begin(up)
    for i in (0, 2, 4, 7):
        store.write_chunk(up.upload_id, *frame(up, i, b"x"))
    with pytest.raises(Conflict, match=r"missing: 1, 3, 5, 6$"):
        store.prepare(up.upload_id, chunks=7)
    with pytest.raises(Conflict, match=r"missing: 1, 3, 5, 6, 8, \.\.\."):
        store.prepare(up.upload_id, chunks=2**32)
    with pytest.raises(Conflict, match="open"):
        store.commit(up.upload_id, {})
    for i in (1, 3):
        store.write_chunk(up.upload_id, *frame(up, i, b"y"))
    with pytest.raises(Conflict, match="beyond 4: 7"):
        store.prepare(up.upload_id, chunks=5)
    for i in (5, 6):
        store.write_chunk(up.upload_id, *frame(up, i, b"y"))
    store.prepare(up.upload_id, chunks=8)
    store.prepare(up.upload_id, chunks=8)
    with pytest.raises(Conflict):
        store.prepare(up.upload_id, chunks=9)
    with pytest.raises(LocalError, match="65536 bytes"):
        store.commit(up.upload_id, {"big": "x" * 65536})
    with pytest.raises(LocalError, match="JSON"):
        store.commit(up.upload_id, {"bad": object()})
    with pytest.raises(LocalError, match="JSON"):
        store.commit(up.upload_id, {"nan": float("nan")})
    v = store.commit(up.upload_id, {"n": (1, 2)})
    assert v.meta == {"n": [1, 2]} and v.chunks == 8
    assert store.commit(up.upload_id, {"ignored": True}) == v  # a retry returns the same version
    with pytest.raises(Conflict):
        store.prepare(up.upload_id, chunks=8)
    store.abort(up.upload_id)  # committed: nothing to abort
    store.abort(uuid.uuid4().hex)  # unknown: fine
    assert store.versions("bkt", "k") == [v]
    with pytest.raises(NotFound):
        store.commit(uuid.uuid4().hex, {})
    with pytest.raises(NotFound):
        store.prepare(uuid.uuid4().hex, chunks=1)


def test_commit_into_a_deleted_bucket_is_refused(store: Store):
    store.create_bucket("gone")
    up = upload(bucket="gone")
    stage(store, up, bodies(1))
    store.prepare(up.upload_id, chunks=1)
    store.delete_bucket("gone")
    with pytest.raises(NoSuchBucket):
        store.commit(up.upload_id, {})


def test_tombstones(store: Store, clock: Clock):
    v1 = put(store, upload(version=1), bodies(1))
    oid = uuid.uuid4().bytes
    clock.t += 5
    t = store.tombstone("bkt", "k", oid, 2, {"by": "me"})
    assert (t.deleted, t.chunks, t.share_bytes, t.committed_at, t.meta) == (True, 0, 0, clock.t, {"by": "me"})
    assert store.tombstone("bkt", "k", oid, 2, {"by": "me"}) == t
    with pytest.raises(Conflict):
        store.tombstone("bkt", "k", oid, 2, {"by": "you"})
    with pytest.raises(Conflict):
        store.tombstone("bkt", "other", oid, 2, {"by": "me"})
    with pytest.raises(Conflict):
        store.tombstone("bkt", "k", v1.object_id, 1, {})
    with pytest.raises(NoSuchBucket):
        store.tombstone("nope", "k", oid, 3, {})
    with pytest.raises(Conflict):
        store.begin(upload(version=2, object_id=oid))
    assert store.versions("bkt", "k") == [t, v1]
    assert store.latest("bkt", "k") == t
    assert store.list("bkt") == []
    with pytest.raises(NotFound):
        store.read_chunk(t, 0)
    assert store.stats()["objects"] == 0


# -- versions and listings ------------------------------------------------------------------


def test_versions_newest_first_by_version_then_object_id(store: Store):
    ids = [bytes([b]) * 16 for b in (5, 1, 9)]
    made = [put(store, upload(version=ver, object_id=oid), bodies(1)) for ver in (3, 1) for oid in ids]
    got = store.versions("bkt", "k")
    assert [(v.version, v.object_id[0]) for v in got] == [(3, 9), (3, 5), (3, 1), (1, 9), (1, 5), (1, 1)]
    assert sorted(made, key=lambda v: (v.version, v.object_id), reverse=True) == got
    assert store.latest("bkt", "missing") is None
    with pytest.raises(NoSuchBucket):
        store.latest("nope", "k")
    with pytest.raises(NoSuchKey):
        store.version("bkt", "other", ids[0], 3)
    with pytest.raises(NoSuchKey):
        store.version("bkt", "k", ids[0], 2)


def test_list_prefix_start_after_limit_and_utf8_order(store: Store, clock: Clock):
    # U+FF71 sorts before U+1F600 in UTF-8 (and code points), after it in UTF-16: we want UTF-8.
    keys = ["a", "a/1", "a/2", "a/3", "b", "é", "\uff71", "\U0001f600", "dead"]
    for i, key in enumerate(keys):
        put(store, upload(key, version=1), bodies(1))
        if key == "a/2":
            put(store, upload(key, version=2), bodies(1))
    store.tombstone("bkt", "dead", uuid.uuid4().bytes, 9, {})
    live = sorted((k for k in keys if k != "dead"), key=lambda k: k.encode())
    assert [v.key for v in store.list("bkt")] == live
    assert [v.key for v in store.list("bkt")] == ["a", "a/1", "a/2", "a/3", "b", "é", "\uff71", "\U0001f600"]
    assert store.list("bkt", prefix="a/")[1].version == 2
    assert [v.key for v in store.list("bkt", prefix="a/")] == ["a/1", "a/2", "a/3"]
    assert [v.key for v in store.list("bkt", prefix="a/", start_after="a/1")] == ["a/2", "a/3"]
    assert [v.key for v in store.list("bkt", start_after="a/3", limit=2)] == ["b", "é"]
    assert [v.key for v in store.list("bkt", prefix="a", start_after="0", limit=2)] == ["a", "a/1"]
    assert store.list("bkt", prefix="zzz") == [] and store.list("bkt", limit=0) == []
    # paging through reaches every key once
    seen, after = [], ""
    while page := store.list("bkt", start_after=after, limit=3):
        seen += [v.key for v in page]
        after = page[-1].key
    assert seen == live
    # list_versions: every version, tombstones too, by key then newest first
    lv = store.list_versions("bkt")
    assert [(v.key, v.version) for v in lv][:6] == [("a", 1), ("a/1", 1), ("a/2", 2), ("a/2", 1), ("a/3", 1),
                                                    ("b", 1)]
    assert [(v.key, v.deleted) for v in lv if v.key == "dead"] == [("dead", True), ("dead", False)]
    assert [(v.key, v.version) for v in store.list_versions("bkt", key_marker="a/1", limit=2)] == [
        ("a/2", 2), ("a/2", 1)]
    first = store.list_versions("bkt", prefix="a/2", limit=1)[0]
    rest = store.list_versions("bkt", prefix="a/2", key_marker="a/2",
                               version_marker=(first.version, first.object_id))
    assert [(v.key, v.version) for v in rest] == [("a/2", 1)]
    with pytest.raises(NoSuchBucket):
        store.list("nope")
    with pytest.raises(LocalError):
        store.list("bkt", limit=-1)


def test_delete_bucket(store: Store):
    with pytest.raises(NoSuchBucket):
        store.delete_bucket("nope")
    store.create_bucket("tmp")
    v = put(store, upload(bucket="tmp"), bodies(2))
    with pytest.raises(BucketNotEmpty):
        store.delete_bucket("tmp")
    store.tombstone("tmp", "k", uuid.uuid4().bytes, 2, {})
    assert store.has_bucket("tmp")
    store.delete_bucket("tmp")  # only a delete marker (and what it hides) was left
    assert not store.has_bucket("tmp")
    assert files_under(store.root, "objects") == []
    assert store.create_bucket("tmp") is True
    assert store.versions("tmp", "k") == []
    with pytest.raises(NoSuchKey):
        store.read_chunk(v, 0)


# -- crash images -------------------------------------------------------------------------

POINTS = ["begin", "write", "prepare:synced", "prepare:cataloged", "commit:cataloged", "commit:renamed"]


def test_crash_at_any_point_leaves_all_or_nothing(tmp_path: Path, clock: Clock):
    """Copy the data directory at each step of a put (a crash image), reopen it, check, collect."""
    data = bodies(3, 500)
    src = tmp_path / "node"
    images: dict[str, Path] = {}

    def snapshot(point: str) -> None:
        if point not in images:
            images[point] = tmp_path / point.replace(":", "-")
            shutil.copytree(src, images[point])

    with Store(src, clock=clock, fsync=False) as s:
        s.create_bucket("bkt")
        old = put(s, upload(version=1), bodies(1, seed=9))
        s._crash_hook = snapshot
        new = put(s, upload(version=2), data)
    assert sorted(images) == sorted(POINTS)
    for point, image in images.items():
        committed = point.startswith("commit:")
        with Store(image, clock=clock, fsync=False) as s:
            got = s.versions("bkt", "k")
            assert got == ([new, old] if committed else [old]), point
            for v in got:
                want = data if v == new else bodies(1, seed=9)
                assert [s.read_chunk(v, i)[1] for i in range(v.chunks)] == want, point
            clock.t += 3601
            s.gc()
            assert files_under(image, "staging") == [], point
            assert len(files_under(image, "objects")) == len(got), point
            assert s.stats()["staging_uploads"] == 0
            assert s.scrub().bad == ()


def test_a_process_killed_after_the_commit_point_keeps_the_version(tmp_path: Path):
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from nodes.store import Store, Upload
        from qstore.framing import encode_frame, parse_frame
        s = Store(sys.argv[1], fsync=True)
        s.create_bucket("bkt")
        s._crash_hook = lambda point: point == sys.argv[2] and os._exit(3)
        up = Upload(upload_id="1" * 32, bucket="bkt", key="k", object_id=bytes(16), version=1, x=1, k=2, n=3)
        s.begin(up)
        for i, body in enumerate({bodies(2)!r}):
            f = parse_frame(encode_frame(object_id=bytes(16), object_version=1, chunk_index=i, x=1, k=2, n=3,
                                         body=body))
            s.write_chunk(up.upload_id, f.header, f.body)
        s.prepare(up.upload_id, chunks=2)
        s.commit(up.upload_id, {{}})
    """)
    for point, visible in (("prepare:synced", False), ("commit:cataloged", True)):
        root = tmp_path / point.replace(":", "-")
        proc = subprocess.run([sys.executable, "-c", script, str(root), point], capture_output=True,
                              text=True)
        assert proc.returncode == 3, proc.stderr
        with Store(root) as s:
            got = s.versions("bkt", "k")
            assert len(got) == int(visible)
            if visible:
                assert s.read_chunk(got[0], 1)[1] == bodies(2)[1]
            s.gc(staging_ttl_s=0)
            assert files_under(root, "staging") == []


# -- scrub and repair -----------------------------------------------------------------------


def flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))


def test_scrub_finds_rot_and_repair_replaces_it(store: Store):
    up = upload(version=4, x=2, k=2, n=3)
    data = bodies(3, 200)
    v = put(store, up, data, {"size": 600})
    (path,) = (store.root / "objects").iterdir()
    flip_byte(path, 250)  # inside chunk 1
    assert store.read_chunk(v, 1)[1] != data[1]  # reads do not re-hash: the client does
    report = store.scrub()
    assert report.pass_complete and report.chunks_checked == 3 and report.bytes_checked == 600
    assert [(b.bucket, b.key, b.version, b.index, b.reason) for b in report.bad] == [
        ("bkt", "k", 4, 1, "digest mismatch")]
    with pytest.raises(ShareCorruption):
        store.read_chunk(v, 1)
    assert store.read_chunk(v, 0)[1] == data[0]
    assert store.stats()["bad_chunks"] == 1
    # a repair: the same version again, as the same share, commits over the bad copy
    fix = Upload(**{**up.__dict__, "upload_id": uuid.uuid4().hex})
    with pytest.raises(Conflict):
        store.begin(Upload(**{**fix.__dict__, "x": 3}))
    fixed = put(store, fix, data, {"size": 600, "repaired": True})
    assert fixed.committed_at == v.committed_at and fixed.meta["repaired"]
    assert [store.read_chunk(v, i)[1] for i in range(3)] == data
    assert store.stats()["bad_chunks"] == 0
    assert len(files_under(store.root, "objects")) == 1 and not path.exists()
    assert store.scrub().bad == ()
    # once healthy, the version cannot be written again
    with pytest.raises(Conflict):
        store.begin(Upload(**{**up.__dict__, "upload_id": uuid.uuid4().hex}))


def test_a_lost_data_file_is_reported_and_repairable(store: Store):
    up = upload()
    v = put(store, up, bodies(2))
    (path,) = (store.root / "objects").iterdir()
    path.unlink()
    with pytest.raises(ShareCorruption, match="missing"):
        store.read_chunk(v, 0)
    assert {b.reason for b in store.scrub().bad} == {"data file missing"}
    put(store, Upload(**{**up.__dict__, "upload_id": uuid.uuid4().hex}), bodies(2))
    assert store.read_chunk(v, 1)[1] == bodies(2)[1]


def test_truncated_data_file(store: Store):
    v = put(store, upload(), bodies(2, 100))
    (path,) = (store.root / "objects").iterdir()
    os.truncate(path, 150)
    with pytest.raises(ShareCorruption, match="truncated"):
        store.read_chunk(v, 1)
    assert [b.reason for b in store.scrub().bad] == ["data file truncated"]


def test_bounded_scrub_resumes_where_it_stopped(store: Store):
    for key in ("a", "b", "c"):
        put(store, upload(key), bodies(4, 100))
    seen = 0
    reports = []
    while True:
        r = store.scrub(max_bytes=250)
        reports.append(r)
        seen += r.chunks_checked
        if r.pass_complete:
            break
    assert seen == 12
    assert [r.chunks_checked for r in reports] == [3, 3, 3, 3]  # the last one finds the end
    assert store.scrub(max_bytes=250).chunks_checked == 3  # and the next pass starts over
    assert store.scrub(max_bytes=0).chunks_checked == 1  # always some progress


# -- garbage collection --------------------------------------------------------------------


def test_gc_of_stale_uploads(store: Store, clock: Clock):
    idle, prepared, busy = upload("i"), upload("p"), upload("b")
    stage(store, idle, bodies(2))
    stage(store, prepared, bodies(2))
    store.prepare(prepared.upload_id, chunks=2)
    clock.t += 3000
    stage(store, busy, bodies(1))
    assert store.stats()["staging_uploads"] == 3
    assert store.gc().stale_uploads == 0
    clock.t += 601
    report = store.gc()
    assert (report.stale_uploads, report.stale_bytes) == (2, 400)
    assert store.stats()["staging_uploads"] == 1
    assert files_under(store.root, "staging") == [f"{busy.upload_id}.part"]
    with pytest.raises(NotFound):
        store.commit(prepared.upload_id, {})
    with pytest.raises(NotFound):
        store.write_chunk(idle.upload_id, *frame(idle, 2, b"late"))
    store.prepare(busy.upload_id, chunks=1)
    store.commit(busy.upload_id, {})


def test_gc_of_superseded_versions(store: Store, clock: Clock):
    v1 = put(store, upload(version=1), bodies(2))
    clock.t += 10
    v2 = put(store, upload(version=2), bodies(2))
    other = put(store, upload("other", version=1), bodies(1))
    assert store.gc().superseded_versions == 0
    clock.t += 86400
    assert store.gc().superseded_versions == 0  # superseded for exactly the TTL: not longer
    clock.t += 1
    report = store.gc()
    assert (report.superseded_versions, report.superseded_bytes) == (1, 200)
    assert store.versions("bkt", "k") == [v2] and store.versions("bkt", "other") == [other]
    with pytest.raises(NoSuchKey):
        store.read_chunk(v1, 0)
    assert len(files_under(store.root, "objects")) == 2
    # a delete marker supersedes too, and is itself never collected while newest
    clock.t += 1
    t = store.tombstone("bkt", "k", uuid.uuid4().bytes, 3, {})
    clock.t += 86401
    assert store.gc().superseded_versions == 1
    assert store.versions("bkt", "k") == [t]
    assert store.gc(superseded_ttl_s=0) == store_mod.GCReport(0, 0, 0, 0, 0, 0, 0)
    assert len(files_under(store.root, "objects")) == 1


def test_gc_removes_orphans_but_nothing_in_use(store: Store):
    v = put(store, upload(), bodies(1))
    live = upload("live")
    stage(store, live, bodies(1))
    (store.root / "staging" / f"{'a' * 32}.part").write_bytes(b"left over")
    (store.root / "objects" / f"{'b' * 32}-{0:016x}-{'c' * 32}.shares").write_bytes(b"left over too")
    (store.root / "objects" / "README").write_text("not ours: left alone")
    report = store.gc()
    assert (report.orphan_files, report.orphan_bytes) == (2, 22)
    assert files_under(store.root, "staging") == [f"{live.upload_id}.part"]
    assert "README" in files_under(store.root, "objects")
    assert store.read_chunk(v, 0)[1] == bodies(1)[0]


# -- the state table, threads, and a model ----------------------------------------------------


def test_state_table_in_docstring_matches_transitions():
    doc = store_mod.__doc__
    rows = re.findall(r"^ {4}(\(none\)|open|prepared|committed) +(\w+) +(\(none\)|open|prepared|committed)",
                      doc, re.M)
    by_value = {s.value: s for s in State}
    table = {(by_value[a], store_mod.Event(e)): by_value[b] for a, e, b in rows}
    assert table == TRANSITIONS


def test_concurrent_writers_and_readers(store: Store):
    up = upload(x=1, k=2, n=2)
    data = bodies(32, 4096)
    store.begin(up)
    errors = []

    def writer(indices):
        try:
            for i in indices:
                store.write_chunk(up.upload_id, *frame(up, i, data[i]))
                store.write_chunk(up.upload_id, *frame(up, i, data[i]))  # retries race too
                store.list("bkt")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(range(t, 32, 4),)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    store.prepare(up.upload_id, chunks=32)
    v = store.commit(up.upload_id, {})
    assert [store.read_chunk(v, i)[1] for i in range(32)] == data


KEYS = ["a", "a/b", "b", "é", "\uff71", "\U0001f600"]
_key, _ver, _oid, _chunks = st.sampled_from(KEYS), st.integers(0, 3), st.integers(0, 2), st.integers(0, 3)
ops = st.lists(st.one_of(
    st.tuples(st.just("put"), _key, _ver, _oid, _chunks),
    st.tuples(st.just("abort"), _key, _ver, _oid, _chunks),
    st.tuples(st.just("tomb"), _key, _ver, _oid, st.just(0)),
    st.tuples(st.just("gc"), st.just(""), st.just(0), st.just(0), st.just(0)),
), max_size=12)


@settings(max_examples=40, deadline=None)
@given(ops)
def test_any_sequence_agrees_with_a_simple_model(sequence):
    model: dict[str, dict[tuple[int, bytes], bool]] = {}  # key -> {(version, object_id): deleted}
    where: dict[tuple[int, bytes], str] = {}
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp), fsync=False) as s:
        s.create_bucket("bkt")
        for op, key, version, oid_byte, nchunks in sequence:
            oid = bytes([oid_byte]) * 16
            taken = (version, oid) in where
            if op == "put":
                up = upload(key, version=version, object_id=oid)
                try:
                    put(s, up, bodies(nchunks))
                except Conflict:
                    assert taken
                else:
                    assert not taken
                    model.setdefault(key, {})[(version, oid)] = False
                    where[(version, oid)] = key
            elif op == "abort":
                up = upload(key, version=version, object_id=oid)
                if taken:
                    with pytest.raises(Conflict):
                        s.begin(up)
                    continue
                stage(s, up, bodies(nchunks))
                if nchunks % 2:
                    s.prepare(up.upload_id, chunks=nchunks)
                s.abort(up.upload_id)
            elif op == "tomb":
                try:
                    s.tombstone("bkt", key, oid, version, {})
                except Conflict:
                    assert taken and not (where[(version, oid)] == key and model[key][(version, oid)])
                else:
                    assert not taken or (where[(version, oid)] == key and model[key][(version, oid)])
                    model.setdefault(key, {})[(version, oid)] = True
                    where[(version, oid)] = key
            else:
                s.gc(staging_ttl_s=0)
            for k in KEYS:
                want = sorted(model.get(k, {}).items(), reverse=True)
                assert [((v.version, v.object_id), v.deleted) for v in s.versions("bkt", k)] == want
            live = sorted((k for k, vs in model.items() if not max(vs.items())[1]), key=str.encode)
            assert [v.key for v in s.list("bkt")] == live
            assert [v.key for v in s.list("bkt", start_after=live[0], limit=2)] == live[1:3] if live else True
            assert len(s.list_versions("bkt")) == sum(map(len, model.values()))
            assert s.stats()["staging_uploads"] == 0
        assert s.scrub().bad == ()
