"""Client library against real KMEs and nodes (aiohttp over mutual TLS on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import io
import json
import os
import time

import aiohttp
import pytest

from client.storage import VERSIONS_FIRST, QStore, QuorumError
from qkd_sim import pki
from qkd_sim.sae import KeySupplyExhausted
from qstore import otp, secret_meta
from qstore.cluster import CLIENT_SAE, node_sae_id
from qstore.errors import LocalError, NoSuchBucket, NoSuchKey
from qstore.framing import HEADER_SIZE
from tests.storage_cluster import start_cluster

CHUNK = 64 << 10


@pytest.fixture
async def cluster(tmp_path):
    c = await start_cluster(tmp_path)
    yield c
    await c.close()


def client(cluster, **kw):
    kw.setdefault("chunk_size", CHUNK)
    return QStore(cluster.state, **kw)


async def test_put_get_round_trip_of_many_sizes(cluster):
    async with client(cluster) as qs:
        assert await qs.create_bucket("bucket-1") is True
        assert await qs.create_bucket("bucket-1") is False
        for size in (0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17):
            data = os.urandom(size)
            report = await qs.put("bucket-1", f"obj-{size}", data)
            assert report.size == size and report.nodes == cluster.sites
            assert await qs.get_bytes("bucket-1", f"obj-{size}") == data


async def test_file_objects_stream_both_ways(cluster, tmp_path):
    data = os.urandom(5 * CHUNK + 123)
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    async with client(cluster) as qs:
        await qs.create_bucket("files-1")
        with src.open("rb") as f:
            await qs.put("files-1", "dir/a.bin", f)
        sink = io.BytesIO()
        report = await qs.get("files-1", "dir/a.bin", sink)
        assert sink.getvalue() == data
        assert report.verified and not report.bad and len(report.nodes) >= cluster.k


async def test_key_spent_is_reported_per_link_and_matches_the_frames(cluster):
    data = os.urandom(2 * CHUNK + 5)
    async with client(cluster) as qs:
        await qs.create_bucket("bkt")
        report = await qs.put("bkt", "k", data)
        frames = [CHUNK, CHUNK, 5]
        # the share of the secret metadata (digest, user metadata) goes sealed with the commit
        meta_share = len(secret_meta.share_doc({"sha256": "0" * 64, "meta": {}}, 5, 3)[0])
        per_link = sum(HEADER_SIZE + f + otp.OTK_SIZE for f in frames) + otp.OTK_SIZE + meta_share
        assert {s: u.key_bytes for s, u in report.links.items()} == {s: per_link for s in cluster.sites}
        assert all(u.bytes_sent > sum(frames) for u in report.links.values())
        gcm = await QStore(cluster.state, chunk_size=CHUNK, link_cipher="aes-256-gcm").__aenter__()
        try:
            r2 = await gcm.put("bkt", "k2", data)
            # the metadata share goes under the object's link cipher too: one more frame key
            per_link = 4 * otp.GCM_KEY_SIZE
            assert {u.key_bytes for u in r2.links.values()} == {per_link}
            assert await gcm.get_bytes("bkt", "k2") == data
            assert (await gcm.head("bkt", "k2")).link_cipher == "aes-256-gcm"
        finally:
            await gcm.close()


async def test_newest_version_wins_and_delete_hides_it(cluster):
    async with client(cluster) as qs:
        await qs.create_bucket("ver")
        await qs.put("ver", "doc", b"first", meta={"owner": "alice"})
        await qs.put("ver", "doc", b"second version", meta={"owner": "bob"})
        assert await qs.get_bytes("ver", "doc") == b"second version"
        info = await qs.head("ver", "doc")
        assert info.size == 14 and info.user_meta == {"owner": "bob"} and len(info.holders) == 5
        assert [i.key for i in await qs.list("ver")] == ["doc"]
        await qs.delete("ver", "doc")
        with pytest.raises(NoSuchKey):
            await qs.get_bytes("ver", "doc")
        with pytest.raises(NoSuchKey):
            await qs.delete("ver", "doc")
        assert await qs.list("ver") == []


async def test_user_metadata_and_content_hash_are_secret_shared(cluster):
    async with client(cluster) as qs:
        await qs.create_bucket("meta")
        await qs.put("meta", "x", b"top secret", meta={"patient": "Jane Doe"})
    for site, node in cluster.nodes.items():
        (v,) = node.store.versions("meta", "x")
        blob = repr(v.meta)
        assert "Jane" not in blob and hashlib.sha256(b"top secret").hexdigest() not in blob, site
        assert v.meta["size"] == 10  # sizes are public, by design


async def test_list_with_prefix_and_pages(cluster):
    async with client(cluster) as qs:
        await qs.create_bucket("lst")
        for name in ("a/1", "a/2", "b/1", "a/3"):
            await qs.put("lst", name, name.encode())
        assert [i.key for i in await qs.list("lst", "a/")] == ["a/1", "a/2", "a/3"]
        assert [i.key for i in await qs.list("lst", start_after="a/2", limit=1)] == ["a/3"]


async def test_missing_bucket_and_bad_arguments(cluster):
    async with client(cluster) as qs:
        with pytest.raises(NoSuchBucket):
            await qs.put("nope", "k", b"x")
        await qs.create_bucket("yes")
        with pytest.raises(NoSuchKey):
            await qs.head("yes", "k")
    with pytest.raises(LocalError):
        QStore(cluster.state, write_quorum=3)  # below k+1
    with pytest.raises(LocalError):
        QStore(cluster.state, link_cipher="rot13")


# -- failures ---------------------------------------------------------------------------------


async def test_any_n_minus_k_nodes_down_still_reads(cluster):
    data = os.urandom(3 * CHUNK)
    async with client(cluster) as qs:
        await qs.create_bucket("fff")
        await qs.put("fff", "obj", data)
    await cluster.stop_node("site1")
    await cluster.stop_node("site4")
    async with client(cluster, node_timeout_s=5) as qs:
        sink = io.BytesIO()
        report = await qs.get("fff", "obj", sink)
        assert sink.getvalue() == data
        assert set(report.failed) == {"site1", "site4"}
        assert not report.verified  # only k nodes left: nothing to check against


async def test_put_with_full_quorum_fails_cleanly_when_a_node_is_down(cluster):
    async with client(cluster) as qs:
        await qs.create_bucket("qqq")
        await qs.put("qqq", "obj", b"old")
    await cluster.stop_node("site2")
    async with client(cluster, node_timeout_s=5) as qs:
        with pytest.raises(QuorumError, match="site2"):
            await qs.put("qqq", "obj", b"new" * 1000)
        assert await qs.get_bytes("qqq", "obj") == b"old"
    for site, node in cluster.nodes.items():
        assert node.store.stats()["staging_uploads"] == 0, site


async def test_put_with_lower_quorum_succeeds_and_repair_restores_the_node(cluster):
    data = os.urandom(2 * CHUNK + 1)
    async with client(cluster) as qs:
        await qs.create_bucket("rrr")
    await cluster.stop_node("site3")
    async with client(cluster, write_quorum=4, node_timeout_s=5) as qs:
        report = await qs.put("rrr", "obj", data)
        assert "site3" in report.failed and len(report.nodes) == 4
    await cluster.start_node("site3")
    async with client(cluster) as qs:
        assert (await qs.head("rrr", "obj")).holders == ("site1", "site2", "site4", "site5")
        summary = await qs.repair("site3")
        assert summary["repaired"] == ["rrr/obj"] and not summary["failed"], summary
        assert (await qs.head("rrr", "obj")).holders == tuple(cluster.sites)
        again = await qs.repair("site3")
        assert again["repaired"] == []
    # site3's share alone plus k-1 others rebuilds the data
    await cluster.stop_node("site1")
    await cluster.stop_node("site2")
    async with client(cluster, node_timeout_s=5) as qs:
        assert await qs.get_bytes("rrr", "obj") == data


def _flip_stored_byte(cluster, site, bucket, key):
    node = cluster.nodes[site]
    (v,) = node.store.versions(bucket, key)
    files = [p for p in (cluster.root / "nodes" / site / "objects").rglob("*") if p.is_file()]
    assert files
    for path in files:
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x40
        path.write_bytes(bytes(raw))
    return v


async def test_bit_rot_on_one_node_is_corrected_and_reported(cluster):
    data = os.urandom(2 * CHUNK)
    async with client(cluster) as qs:
        await qs.create_bucket("rot")
        await qs.put("rot", "obj", data)
        _flip_stored_byte(cluster, "site2", "rot", "obj")
        sink = io.BytesIO()
        report = await qs.get("rot", "obj", sink)
        assert sink.getvalue() == data
        assert "site2" in report.bad or "site2" not in report.nodes
        # and repair puts a good share back
        await qs.repair("site2")
    await cluster.stop_node("site1")
    await cluster.stop_node("site3")
    async with client(cluster, node_timeout_s=5) as qs:
        report = await qs.get("rot", "obj", io.BytesIO())
        assert not report.bad


class _Pinned(dict):
    """Latencies in which site1 always looks fastest."""

    def get(self, key, default=None):
        return -1.0 if key == "site1" else super().get(key, default)


async def test_a_forged_validly_sealed_share_is_corrected_and_named(cluster, monkeypatch):
    data = os.urandom(3 * CHUNK)
    async with client(cluster) as qs:
        await qs.create_bucket("forge")
        await qs.put("forge", "obj", data)
        store = cluster.nodes["site1"].store
        real = store.read_chunk

        def lying(v, index):
            header, body = real(v, index)
            forged = bytes(b ^ 0x5A for b in body[:64]) + body[64:]
            from dataclasses import replace

            return replace(header, digest=hashlib.sha256(forged).digest()), forged

        monkeypatch.setattr(store, "read_chunk", lying)
        qs._latency = _Pinned()  # ask the liar first, so that it is caught rather than skipped
        sink = io.BytesIO()
        report = await qs.get("forge", "obj", sink)
        assert sink.getvalue() == data
        assert "site1" in report.bad


async def test_an_empty_key_pool_fails_naming_the_link_and_leaves_nothing(tmp_path):
    cluster = await start_cluster(tmp_path, link_rate=0.0, capacity_bits=8 * (6 << 20), key_wait_s=1.0)
    try:
        async with client(cluster, key_wait_s=1.0) as qs:
            await qs.create_bucket("dry")
            with pytest.raises(KeySupplyExhausted, match=r"kme\.client"):
                await qs.put("dry", "big", os.urandom(8 << 20))
            with pytest.raises(NoSuchKey):
                await qs.head("dry", "big")
        for site, node in cluster.nodes.items():
            assert node.store.stats()["staging_uploads"] == 0, site
    finally:
        await cluster.close()


async def test_replayed_and_tampered_envelopes_are_refused(cluster):
    captured = []
    async with client(cluster) as qs:
        await qs.create_bucket("www")
        node = next(nd for nd in qs._nodes if nd.site == "site1")
        orig = node.call

        async def spy(method, path, **kw):
            if path.endswith(("/chunks", "/oneshot")):
                captured.append((path, kw["data"], kw.get("headers"), kw.get("params")))
            return await orig(method, path, **kw)

        node.call = spy
        await qs.put("www", "obj", b"hello" * 100)
        node.call = orig
        path, envelope, headers, params = captured[0]
        upload = "/v1/uploads/" + "ab" * 16
        ident = cluster.ids[CLIENT_SAE]
        ctx = pki.client_ssl_context(ident.cert, ident.key, ident.ca)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
            base = cluster.urls["site1"]
            async with s.post(base + "/v1/uploads", json={
                    "upload_id": "ab" * 16, "bucket": "www", "key": "evil", "object_id": "cd" * 16,
                    "version": 1, "x": 1, "k": 3, "n": 5}) as r:
                assert r.status == 200
            async with s.put(base + path, data=envelope, headers=headers, params=params) as r:  # its upload
                assert r.status in (403, 404)
            async with s.put(base + upload + "/chunks", data=envelope) as r:  # replay into a new one
                assert r.status == 403 and (await r.json())["error"] == "SealError"
            tampered = bytearray(envelope)
            tampered[-20] ^= 1
            async with s.put(base + upload + "/chunks", data=bytes(tampered)) as r:
                assert r.status in (403, 409)


async def test_wrong_certificates_are_refused(cluster, tmp_path):
    rogue = pki.create_ca(tmp_path / "rogue")
    ident = pki.issue(rogue, CLIENT_SAE, tmp_path / "rogue")
    ctx = pki.client_ssl_context(ident.cert, ident.key, cluster.ids[CLIENT_SAE].ca)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        with pytest.raises(aiohttp.ClientError):
            async with s.get(cluster.urls["site1"] + "/v1/health"):
                pass
    # a node certificate cannot read as the client: its KME has no keys for it from the nodes
    assert node_sae_id("site1") != CLIENT_SAE


async def test_concurrent_puts_and_gets(cluster):
    blobs = {f"o{i}": os.urandom(CHUNK + i * 1000) for i in range(6)}
    async with client(cluster) as qs:
        await qs.create_bucket("ccc")
        await asyncio.gather(*(qs.put("ccc", name, data) for name, data in blobs.items()))
        got = await asyncio.gather(*(qs.get_bytes("ccc", name) for name in blobs))
        assert got == list(blobs.values())


async def test_a_slow_node_is_raced_by_another(cluster, monkeypatch):
    import time

    data = os.urandom(2 * CHUNK)
    async with client(cluster) as qs:
        await qs.create_bucket("slow")
        await qs.put("slow", "obj", data)
    store = cluster.nodes["site1"].store
    real = store.read_chunk

    def sluggish(v, index):
        time.sleep(1.5)  # in the node's worker thread: the node answers, late
        return real(v, index)

    monkeypatch.setattr(store, "read_chunk", sluggish)
    async with client(cluster, hedge_s=0.2) as qs:
        qs._latency = _Pinned()  # site1 looks fastest, so it is asked first
        started = asyncio.get_running_loop().time()
        sink = io.BytesIO()
        report = await qs.get("slow", "obj", sink)
        assert sink.getvalue() == data
        assert "site1" in report.slow and "site1" not in report.nodes and report.verified
        assert asyncio.get_running_loop().time() - started < 1.5 * 2


async def test_ranges_versions_and_async_sinks(cluster):
    data = os.urandom(3 * CHUNK + 100)
    async with client(cluster) as qs:
        await qs.create_bucket("rng")
        await qs.put("rng", "obj", data)
        for start, end in [(0, 1), (5, CHUNK), (CHUNK - 1, CHUNK + 1), (CHUNK, 3 * CHUNK + 100),
                           (17, 17), (3 * CHUNK + 99, 3 * CHUNK + 100), (0, len(data))]:
            sink = io.BytesIO()
            report = await qs.get("rng", "obj", sink, start=start, end=end)
            assert sink.getvalue() == data[start:end] and report.size == end - start, (start, end)
        with pytest.raises(LocalError):
            await qs.get("rng", "obj", io.BytesIO(), start=10, end=len(data) + 1)
        info = await qs.head("rng", "obj")
        await qs.put("rng", "obj", b"newer")
        old = io.BytesIO()
        await qs.get("rng", "obj", old, version=(info.version, info.object_id))
        assert old.getvalue() == data
        assert await qs.get_bytes("rng", "obj") == b"newer"

        class AsyncSink:
            def __init__(self):
                self.parts = []

            async def write(self, chunk):
                await asyncio.sleep(0)
                self.parts.append(bytes(chunk))

        sink = AsyncSink()
        await qs.get("rng", "obj", sink)
        assert b"".join(sink.parts) == b"newer"


async def test_put_from_an_async_source(cluster):
    data = os.urandom(2 * CHUNK + 7)

    class Body:  # reads in odd pieces, as a network stream does
        def __init__(self):
            self.pos = 0

        async def read(self, n):
            await asyncio.sleep(0)
            piece = data[self.pos : self.pos + min(n, 1000 + self.pos % 777)]
            self.pos += len(piece)
            return piece

    async with client(cluster) as qs:
        await qs.create_bucket("async-src")
        report = await qs.put("async-src", "obj", Body())
        assert report.size == len(data)
        assert await qs.get_bytes("async-src", "obj") == data


async def test_small_objects_take_one_request_per_node_before_commit(cluster):
    calls = []
    async with client(cluster) as qs:
        await qs.create_bucket("small")
        for nd in qs._nodes:
            orig = nd.call

            async def spy(method, path, _orig=orig, **kw):
                calls.append(path.rsplit("/", 1)[-1])
                return await _orig(method, path, **kw)

            nd.call = spy
        await qs.put("small", "tiny", b"x" * 1000)
        assert sorted(set(calls)) == ["commit", "oneshot"] and len(calls) == 10
        calls.clear()
        report = await qs.get("small", "tiny", io.BytesIO())
        assert calls == ["versions"] * 5  # each share came with its node's answer: no second trip
        assert report.verified and not report.bad
        _flip_stored_byte(cluster, "site2", "small", "tiny")  # a rotten share is not sent along as good
        sink = io.BytesIO()
        report = await qs.get("small", "tiny", sink)
        assert sink.getvalue() == b"x" * 1000
        assert "site2" in report.bad or "site2" not in report.nodes
    ident = cluster.ids[CLIENT_SAE]
    ctx = pki.client_ssl_context(ident.cert, ident.key, ident.ca)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        url = cluster.urls["site1"] + "/v1/uploads/" + "ef" * 16 + "/oneshot"
        for headers in ({}, {"X-QStore-Upload": "not json"}, {"X-QStore-Upload": '{"upload_id": "other"}'}):
            async with s.put(url, params={"chunks": "0"}, headers=headers) as r:
                assert r.status == 400, headers


async def test_concurrent_gets_share_a_bounded_number_of_chunk_fetches(cluster, monkeypatch):
    """Many gets through one QStore (a gateway serving ranged GETs) fetch at most FETCH_SLOTS chunks at
    once between them, and every one still reads its bytes."""
    from client import storage

    busy = peak = 0
    real = QStore._fetch_chunk_now

    async def counted(self, *args):
        nonlocal busy, peak
        busy += 1
        peak = max(peak, busy)
        try:
            return await real(self, *args)
        finally:
            busy -= 1

    monkeypatch.setattr(QStore, "_fetch_chunk_now", counted)
    bodies = {f"o{i}": os.urandom(9 * 1024 + i) for i in range(6)}
    async with QStore(cluster.state, chunk_size=1024) as qs:
        await qs.create_bucket("slots")
        for name, body in bodies.items():
            await qs.put("slots", name, body)
        got = await asyncio.gather(*(qs.get_bytes("slots", name) for name in bodies))
    assert got == list(bodies.values())
    # six gets of ten chunks, each keeping READ_WINDOW in flight: overlapping, and without the bound
    # up to 18 at once
    assert storage.READ_WINDOW < peak <= storage.FETCH_SLOTS < len(bodies) * storage.READ_WINDOW


def _walk(obj, found):
    """Every value of a key named "secret" in nested JSON-like data."""
    if isinstance(obj, dict):
        for name, value in obj.items():
            if name == "secret":
                found.append(value)
            _walk(value, found)
    elif isinstance(obj, list | tuple):
        for value in obj:
            _walk(value, found)


async def test_shares_of_secret_metadata_cross_links_only_sealed(cluster):
    """Someone who records every client-node exchange and strips TLS (one day, a quantum computer)
    finds no share of an object's digest or user metadata: the nodes hold them at rest, but they
    travel only inside one-time-pad envelopes (puts small and chunked, head, get, listings, repair)."""
    wire: list[object] = []

    def record(qs):
        for nd in qs._nodes:
            orig = nd.call

            async def spy(method, path, _orig=orig, **kw):
                out = await _orig(method, path, **kw)
                wire.append(copy.deepcopy((path, kw.get("params"), kw.get("headers"), kw.get("body"),
                                           kw.get("data"), out)))  # as it crossed, before the client opens it
                return out

            nd.call = spy

    names = ("small", "large", "repaired")
    async with client(cluster) as qs:
        record(qs)
        await qs.create_bucket("sealed")
        small, large = b"small secret", os.urandom(2 * CHUNK + 3)
        await qs.put("sealed", "small", small, meta={"patient": "Jane Doe"})
        await qs.put("sealed", "large", large, meta={"patient": "John Roe"})
        assert (await qs.head("sealed", "small")).user_meta == {"patient": "Jane Doe"}
        assert await qs.get_bytes("sealed", "large") == large
        listed = {i.key: i.user_meta for i in await qs.list_meta("sealed")}
        assert listed == {"large": {"patient": "John Roe"}, "small": {"patient": "Jane Doe"}}
    await cluster.stop_node("site3")
    async with client(cluster, write_quorum=4, node_timeout_s=5) as qs:
        record(qs)
        await qs.put("sealed", "repaired", b"later", meta={"patient": "Max Mustermann"})
    await cluster.start_node("site3")
    async with client(cluster) as qs:  # the repair gives site3 its share of the secret, sealed
        record(qs)
        assert (await qs.repair("site3"))["repaired"] == ["sealed/repaired"]
        assert (await qs.head("sealed", "repaired")).holders == tuple(cluster.sites)
    at_rest = [v.meta["secret"] for node in cluster.nodes.values() for name in names
               for v in node.store.versions("sealed", name)]
    assert len(at_rest) == len(names) * len(cluster.sites)
    found: list[object] = []
    _walk(wire, found)
    assert found, "the recording saw no metadata share go by"
    for value in found:  # the "?secret=1" flag, or an envelope
        assert value == "1" or otp.envelope_cipher(base64.b64decode(value)) == "otp", value
    text = repr(wire)
    for share in at_rest:
        assert share not in text and repr(bytes.fromhex(share))[2:-1] not in text
    for path, _params, _headers, _body, data, _out in wire:
        assert data is None or all(bytes.fromhex(s) not in bytes(data) for s in at_rest), path


async def test_a_node_refuses_metadata_shares_in_the_clear_and_commits_without_them(cluster):
    ident = cluster.ids[CLIENT_SAE]
    ctx = pki.client_ssl_context(ident.cert, ident.key, ident.ca)
    async with client(cluster) as qs:
        await qs.create_bucket("clear")
        await qs.put("clear", "obj", b"data", meta={"a": "b"})
    base = cluster.urls["site1"]
    upload = "12" * 16
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        async with s.get(base + "/v1/versions", params={"bucket": "clear", "key": "obj"}) as r:
            doc = await r.json()
            assert r.status == 200 and "secrets" not in doc and "secret" not in doc["versions"][0]["meta"]
        async with s.get(base + "/v1/versions", params={"bucket": "clear", "key": "obj", "secret": "1"}) as r:
            doc = await r.json()
            assert otp.envelope_cipher(base64.b64decode(doc["secrets"])) == "otp"
        async with s.post(base + "/v1/uploads", json={
                "upload_id": upload, "bucket": "clear", "key": "new", "object_id": "ab" * 16,
                "version": 7, "x": 1, "k": 3, "n": 5}) as r:
            assert r.status == 200
        async with s.post(base + f"/v1/uploads/{upload}/prepare", json={"chunks": 0}) as r:
            assert r.status == 200
        for body in ({"meta": {"secret": "00" * 64}}, {"meta": {}}, {"meta": {}, "secret": "not base64!"}):
            async with s.post(base + f"/v1/uploads/{upload}/commit", json=body) as r:
                assert r.status == 400, body
                assert "secret" in (await r.json())["message"]
    assert cluster.nodes["site1"].store.versions("clear", "new") == []


async def dec_keys_requests(cluster) -> float:
    """dec_keys requests all KMEs of the cluster have answered (their /metrics)."""
    from qstore.telemetry import Figures

    me = cluster.ids[CLIENT_SAE]
    tls = aiohttp.TCPConnector(ssl=pki.client_ssl_context(me.cert, me.key, me.ca))
    total = 0.0
    async with aiohttp.ClientSession(connector=tls) as http:
        for running in cluster.kmes.values():
            async with http.get(running.url + "/metrics") as resp:
                assert resp.status == 200
                total += Figures(await resp.text()).value("qstore_kme_requests_total", operation="dec_keys",
                                                          status="200")
    return total


async def test_keys_fetched_ahead_are_announced_and_opened_without_a_kme_trip_each(cluster):
    """A long-lived client (the gateway) and the nodes name the keys they fetched ahead; the receiver
    fetches each batch in one dec_keys, so small objects move without a KME request per envelope."""
    bodies = {f"o{i}": os.urandom(4096 + i) for i in range(40)}
    before = await dec_keys_requests(cluster)
    async with client(cluster, key_ahead=True) as qs:
        await qs.create_bucket("ahead")
        for name, body in bodies.items():
            await qs.put("ahead", name, body, meta={"n": name})
        for name, body in bodies.items():
            assert await qs.get_bytes("ahead", name) == body
            assert (await qs.head("ahead", name)).user_meta == {"n": name}
    ops = 3 * len(bodies)  # puts, gets, heads: each seals to or opens from all five nodes
    per_envelope = ops * len(cluster.sites)
    requests = await dec_keys_requests(cluster) - before
    assert requests < ops < per_envelope, requests
    async with client(cluster) as qs:  # a short-lived client announces nothing and still reads
        assert await qs.get_bytes("ahead", "o7") == bodies["o7"]


async def test_two_processes_of_one_sae_never_take_each_others_announced_keys(cluster):
    async with client(cluster, key_ahead=True) as a, client(cluster, key_ahead=True) as b:
        await a.create_bucket("two")
        for i in range(30):
            writer, reader = (a, b) if i % 2 else (b, a)
            body = os.urandom(3000 + i)
            await writer.put("two", f"k{i}", body)
            got = await asyncio.gather(reader.get_bytes("two", f"k{i}"), writer.get_bytes("two", f"k{i}"))
            assert got == [body, body]


async def test_a_restarted_node_gets_fresh_keys_and_replays_stay_refused(cluster):
    async with client(cluster, key_ahead=True) as qs:
        await qs.create_bucket("restart")
        for i in range(10):
            await qs.put("restart", f"before{i}", b"x" * 2000)
        await cluster.stop_node("site2")
        await cluster.start_node("site2")  # it lost the keys it fetched on our announcements
        report = await qs.put("restart", "after", b"y" * 2000)
        assert report.nodes == cluster.sites and not report.failed
        assert await qs.get_bytes("restart", "after") == b"y" * 2000

        node = next(nd for nd in qs._nodes if nd.site == "site3")
        orig, captured = node.call, []

        async def spy(method, path, **kw):
            if path.endswith("/oneshot"):
                captured.append((path, kw["data"], kw["headers"], kw["params"]))
            return await orig(method, path, **kw)

        node.call = spy
        await qs.put("restart", "once", b"z" * 2000)
        node.call = orig
    path, envelope, headers, params = captured[0]
    ident = cluster.ids[CLIENT_SAE]
    ctx = pki.client_ssl_context(ident.cert, ident.key, ident.ca)
    replay = path.replace(path.split("/")[3], "cd" * 16)
    doc = json.loads(headers["X-QStore-Upload"])
    headers = {"X-QStore-Upload": json.dumps({**doc, "upload_id": "cd" * 16, "key": "replayed"})}
    async with (aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s,
                s.put(cluster.urls["site3"] + replay, data=envelope, headers=headers, params=params) as r):
        assert r.status == 403 and (await r.json())["error"] == "SealError"
    assert cluster.nodes["site3"].store.versions("restart", "replayed") == []


async def test_gets_ask_for_the_newest_versions_first_and_all_only_when_older_ones_matter(cluster):
    async with client(cluster) as qs:
        await qs.create_bucket("many")
        for i in range(8):  # a key written often: each get still names only the newest versions
            await qs.put("many", "often", b"v%d" % i)
        assert await qs.get_bytes("many", "often") == b"v7"
        await qs.put("many", "hidden", b"readable")
        # three nodes then hold more newer versions each than a first answer names, none readable
        for site in ("site1", "site2", "site3"):
            for j in range(VERSIONS_FIRST + 1):
                cluster.nodes[site].store.tombstone("many", "hidden", os.urandom(16), time.time_ns() + j, {})
        assert await qs.get_bytes("many", "hidden") == b"readable"
        assert (await qs.head("many", "hidden")).size == len(b"readable")
