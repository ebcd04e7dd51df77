"""The node's share store with committed data in an S3 bucket (moto's server on 127.0.0.1 stands in)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import uuid
from pathlib import Path

import pytest
from test_store import bodies, frame, put, stage, upload

from nodes.blobs import BlobStoreUnavailable, S3Blobs
from nodes.store import Store
from qstore.errors import NotFound, ShareCorruption
from tests.storage_cluster import put_get, three_sites_toml

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def fake_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


@pytest.fixture
def s3(s3_url):
    return boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


@pytest.fixture
def bucket(s3):
    name = f"qstore-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def keys(s3, bucket: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def make_store(s3_url, bucket, tmp_path):
    opened: list[Store] = []

    def make(root: Path | None = None, **kw) -> Store:
        kw.setdefault("multipart_threshold", 5 << 20)
        kw.setdefault("multipart_chunksize", 5 << 20)
        blobs = S3Blobs(bucket, endpoint_url=s3_url, prefix="node1", **kw)
        s = Store(root or tmp_path / "node", fsync=False, blobs=blobs)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


def test_put_read_list_gc_scrub_with_the_data_in_the_bucket(make_store, s3, bucket):
    store = make_store()
    store.create_bucket("bkt")
    data = bodies(3, 1000)
    v = put(store, upload(), data)
    assert [store.read_chunk(v, i)[1] for i in range(3)] == data
    buf = bytearray(2000)
    header = store.read_chunk_into(v, 1, buf)
    assert bytes(buf[: header.body_length]) == data[1]
    # The bytes are in the bucket under the node's prefix, not in its data directory.
    (key,) = keys(s3, bucket)
    assert key.startswith("node1/") and key.endswith(".shares")
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"".join(data)
    assert not (store.root / "objects").exists()
    assert [f for f in files(store.root) if not f.startswith("catalog") and f != "lock"] == []
    assert store.scrub().bad == ()
    # A newer version supersedes; gc removes the old object from the bucket.
    v2 = put(store, upload(object_id=v.object_id, version=2), bodies(1, 10, seed=2))
    assert len(keys(s3, bucket)) == 2
    store.clock = lambda: 10**12
    report = store.gc(superseded_ttl_s=0)
    assert report.superseded_versions == 1 and len(keys(s3, bucket)) == 1
    assert store.read_chunk(v2, 0)[1] == bodies(1, 10, seed=2)[0]


def test_multipart_upload_and_ranged_reads_of_a_large_file(make_store, s3, bucket):
    store = make_store()
    store.create_bucket("bkt")
    data = [os.urandom(3 << 20) for _ in range(4)]  # 12 MiB: three 5 MiB parts
    v = put(store, upload(), data)
    (key,) = keys(s3, bucket)
    head = s3.head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == 12 << 20 and "-" in head["ETag"]  # a multipart ETag
    assert [store.read_chunk(v, i)[1] for i in (3, 0, 2, 1)] == [data[3], data[0], data[2], data[1]]


def test_scrub_and_reads_see_a_rotten_or_missing_object(make_store, s3, bucket):
    store = make_store()
    store.create_bucket("bkt")
    v = put(store, upload(), bodies(2, 100))
    (key,) = keys(s3, bucket)
    blob = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    blob[150] ^= 1
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(blob))
    (bad,) = store.scrub().bad
    assert bad.index == 1 and bad.reason == "digest mismatch"
    with pytest.raises(ShareCorruption):
        store.read_chunk(v, 1)
    assert store.read_chunk(v, 0)[1] == bodies(2, 100)[0]
    s3.delete_object(Bucket=bucket, Key=key)
    with pytest.raises(ShareCorruption, match="missing"):
        store.read_chunk(v, 0)
    assert {b.reason for b in store.scrub().bad} == {"data file missing"}


def test_a_crash_before_the_commit_point_leaves_nothing_visible(make_store, s3, bucket, tmp_path):
    """Crash images of the data dir at each step; the bucket as it was at that moment (uploads only add)."""
    src = tmp_path / "node"
    store = make_store(src)
    store.create_bucket("bkt")
    images: dict[str, Path] = {}

    def snapshot(point: str) -> None:
        if point not in images:
            images[point] = tmp_path / point.replace(":", "-")
            shutil.copytree(src, images[point])

    store._crash_hook = snapshot
    v = put(store, upload(), bodies(2, 300))
    store.close()
    assert sorted(images) == sorted(["begin", "write", "prepare:synced", "prepare:cataloged",
                                     "commit:uploaded", "commit:cataloged", "commit:renamed"])
    (key,) = keys(s3, bucket)
    for point, image in images.items():
        (image / "lock").unlink()
        s = make_store(image)
        visible = point in ("commit:cataloged", "commit:renamed")
        got = s.versions("bkt", "k")
        assert got == ([v] if visible else []), point
        if visible:
            assert [s.read_chunk(got[0], i)[1] for i in range(2)] == bodies(2, 300), point
        s.clock = lambda: 10**12
        s.gc(staging_ttl_s=0)
        # Nothing left in staging; the object stays only if the version exists (an orphan upload is swept).
        assert not any((image / "staging").iterdir()), point
        assert keys(s3, bucket) == ([key] if visible else []), point
        s.close()
        if not visible:  # put the object back for the next image (the bucket is shared)
            s3.put_object(Bucket=bucket, Key=key, Body=b"".join(bodies(2, 300)))


def test_an_unreachable_object_store_fails_the_commit_and_keeps_it_prepared(make_store, tmp_path):
    store = make_store()
    store.create_bucket("bkt")
    up = upload()
    stage(store, up, bodies(1))
    store.prepare(up.upload_id, chunks=1)
    real = store.blobs.client
    from botocore.config import Config

    store.blobs.client = boto3.client("s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
                                      config=Config(retries={"max_attempts": 1}, connect_timeout=1))
    with pytest.raises(BlobStoreUnavailable):
        store.commit(up.upload_id, {})
    assert store.versions("bkt", "k") == []
    store.blobs.client = real
    v = store.commit(up.upload_id, {})  # the retry goes through
    assert store.read_chunk(v, 0)[1] == bodies(1)[0]
    with pytest.raises(NotFound):
        store.write_chunk(up.upload_id, *frame(up, 0, bodies(1)[0]))


def test_a_missing_bucket_is_refused_at_open(s3_url):
    with pytest.raises(BlobStoreUnavailable):
        S3Blobs("no-such-bucket-here", endpoint_url=s3_url)
    S3Blobs("made-on-demand", endpoint_url=s3_url, create_bucket=True).close()


async def test_cluster_round_trip_with_every_node_on_s3(tmp_path, s3_url, s3, bucket):
    from client.storage import QStore
    from tests.storage_cluster import start_cluster

    cluster = await start_cluster(tmp_path, blob_store="s3", s3_endpoint=s3_url, s3_bucket=bucket)
    try:
        data = os.urandom(3 * (64 << 10) + 17)
        async with QStore(cluster.state, chunk_size=64 << 10) as qs:
            await qs.create_bucket("bucket-1")
            await qs.put("bucket-1", "obj", data)
            assert await qs.get_bytes("bucket-1", "obj") == data
    finally:
        await cluster.close()
    prefixes = {k.split("/", 1)[0] for k in keys(s3, bucket)}
    assert len(prefixes) == len(cluster.sites)  # one prefix per node: <sae id>/
    for site in cluster.sites:
        assert not (tmp_path / "nodes" / site / "objects").exists()


def s3_cluster(url: str, bucket: str) -> str:
    """north and south on the bucket (south with its own prefix and a region), east on its disk."""
    return three_sites_toml("s3sites", {
        "north": {"backend": "s3", "endpoint": url, "bucket": bucket},
        "south": {"backend": "s3", "endpoint": url, "bucket": bucket, "prefix": "south-shares/",
                  "region": "eu-central-1"}})


def test_the_cluster_file_puts_a_sites_shares_in_its_bucket(tmp_path, s3_url, s3, bucket):
    """`[sites.storage]` in the cluster file: `cluster up` starts those nodes on the bucket (credentials from
    the environment), the other node on its disk; cluster.json carries no secret."""
    from client import cluster
    from nodes.service import NodeConfig

    conf = tmp_path / "sites.toml"
    conf.write_text(s3_cluster(s3_url, bucket))
    root = tmp_path / "state"
    state = cluster.up(conf, root, gateway=False, timeout_s=60)
    try:
        assert state.node("north").storage == {"backend": "s3", "endpoint": s3_url, "bucket": bucket}
        assert state.node("east").storage is None
        south = NodeConfig.from_state(state, "south")
        assert (south.blob_store, south.s3_bucket, south.s3_prefix, south.s3_region, south.s3_secret_key) == (
            "s3", bucket, "south-shares/", "eu-central-1", None)
        assert NodeConfig.from_state(state, "east").blob_store == "local"
        assert "testing" not in (root / "cluster.json").read_text()
        data = os.urandom(3 * (64 << 10) + 5)
        assert put_get(state, data) == data
    finally:
        cluster.down(root)
    prefixes = {k.split("/", 1)[0] for k in keys(s3, bucket)}
    assert prefixes == {"node.north", "south-shares"}
    for site in ("north", "south"):
        assert not (root / "nodes" / site / "objects").exists()
    assert files(root / "nodes" / "east" / "objects")  # the east node kept its shares on disk


@pytest.mark.parametrize(("storage", "says"), [
    ('backend = "s3"\nbucket = "b"\nsecret_key = "x"', "credentials do not belong in the cluster file"),
    ('backend = "s3"\nbucket = "b"\naws_access_key_id = "x"', "AWS_ACCESS_KEY_ID"),
    ('backend = "s3"', 'backend "s3" needs a bucket'),
    ('backend = "ceph"', 'must be "local" or "s3"'),
    ('bucket = "b"', 'storage bucket is for backend "s3"'),
    ('backend = "s3"\nbucket = "b"\nendpoint = "minio:9000"', "must be an http:// or https:// URL"),
    ('backend = "s3"\nbucket = ""', "bucket must be a non-empty string"),
    ('backend = "s3"\nbucket = "b"\nbukket = "c"', "unknown key(s) bukket"),
])
def test_bad_storage_sections_are_refused_naming_the_site(storage, says):
    from qkd_sim.network import ConfigError, Network

    text = f'[[sites]]\nname = "a"\n[sites.storage]\n{storage}\n[[sites]]\nname = "b"\n'
    text += '[[links]]\na = "a"\nb = "b"\nrate = "unlimited"\n[cluster]\nk = 2\n'
    with pytest.raises(ConfigError) as err:
        Network.from_dict(__import__("tomllib").loads(text), source="x.toml")
    assert says in str(err.value) and "(a)" in str(err.value)
    assert "\"x\"" not in str(err.value)


def test_storage_on_a_site_without_a_node_is_refused():
    from qkd_sim.network import ConfigError, Network

    desk = {"name": "desk", "node": False, "storage": {"backend": "s3", "bucket": "x"}}
    doc = {"cluster": {"k": 2}, "sites": [{"name": "a"}, {"name": "b"}, desk],
        "links": [{"a": "a", "b": "b", "rate": "unlimited"}, {"a": "desk", "b": "a", "rate": "unlimited"}]}
    with pytest.raises(ConfigError, match="has no node"):
        Network.from_dict(doc)
    doc["sites"][2]["storage"] = "s3://x"
    with pytest.raises(ConfigError, match="must be a table"):
        Network.from_dict(doc)


def test_up_fails_clearly_when_a_sites_bucket_is_missing(tmp_path, s3_url):
    from client import cluster

    conf = tmp_path / "sites.toml"
    conf.write_text(s3_cluster(s3_url, "no-such-bucket-here"))
    root = tmp_path / "state"
    with pytest.raises(cluster.ClusterStartError) as err:
        cluster.up(conf, root, gateway=False, timeout_s=60)
    # whichever of the two nodes on the bucket stops first is named, with its prefix
    said = str(err.value)
    assert re.search(r"node node\.(north|south) exited .*s3://no-such-bucket-here/(node\.north|south-shares)/"
                     r": no such bucket \(create it first\)", said, re.S), said
    assert not (root / "cluster.json").exists()
