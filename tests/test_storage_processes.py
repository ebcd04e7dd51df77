"""Failure behaviour with real processes: a cluster from `qstore cluster up`, the `qstore` CLI, SIGKILL.

test_storage.py runs the same scenarios with every KME and node in the test's
event loop; here each KME and node is a process of its own (started by
:func:`client.cluster.up` from ``deploy/local.toml``: five storage sites and a
client site, k = 3), the commands run as `python -m client.cli` processes, and
a node "fails" by SIGKILL from the pid in ``cluster.json``. One cluster serves
the module; each test restarts the nodes it killed (the ``live`` fixture does
it again afterwards, so the order of tests does not matter) and names its
objects apart. The empty key pool gets a small cluster of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from client import cluster
from client.storage import QStore
from qkd_sim import pki
from qkd_sim.sae import KeySupplyExhausted
from qstore.cluster import CLIENT_SAE, ClusterState
from qstore.errors import NoSuchKey

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "default"  # the CLI's
CHUNK = 256 << 10
SITES = ("site1", "site2", "site3", "site4", "site5")


# -- the CLI as a user runs it -------------------------------------------------------------------


def start(state: Path, *args: object) -> subprocess.Popen[str]:
    """`qstore ARGS --state STATE` in a process of its own, from the repository root."""
    return subprocess.Popen([sys.executable, "-m", "client.cli", *map(str, args), "--state", str(state)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def qstore(state: Path, *args: object) -> subprocess.CompletedProcess[str]:
    return finish(start(state, *args))


def qstore_ok(state: Path, *args: object) -> object:
    """Run a `--json` command that must succeed; its parsed output."""
    res = qstore(state, *args, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def qstore_all(state: Path, *commands: tuple[object, ...]) -> list[subprocess.CompletedProcess[str]]:
    """Independent commands at once (each CLI start costs a second of imports)."""
    return [finish(p) for p in [start(state, *c) for c in commands]]


def assert_one_line_error(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert res.returncode != 0, res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qstore: "), res.stderr
    assert "Traceback" not in res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# -- the cluster's processes ---------------------------------------------------------------------


class Live:
    """A running cluster of processes in ``root``: kill and restart its nodes, call them, use it."""

    def __init__(self, root: Path):
        self.root = root

    @property
    def state(self) -> ClusterState:
        return ClusterState.load(self.root)

    def data(self, site: str) -> Path:
        data = self.state.node(site).data
        assert data is not None
        return data

    def staged(self, site: str) -> set[Path]:
        return set((self.data(site) / "staging").iterdir())

    def kill(self, *sites: str) -> None:
        for site in sites:
            pid = self.state.node(site).pid
            assert cluster.is_ours(pid, self.root), f"{site} is not running"
            os.kill(pid, signal.SIGKILL)
        for site in sites:
            pid = self.state.node(site).pid
            try:
                os.waitpid(pid, 0)  # our child (started by up or restart): reap it
            except ChildProcessError:
                deadline = time.monotonic() + 10
                while cluster.is_ours(pid, self.root):
                    assert time.monotonic() < deadline, f"{site} survived SIGKILL"
                    time.sleep(0.02)

    def restart(self, *sites: str) -> None:
        """Start the nodes of ``sites`` again as `qstore cluster up` does, on their ports, and wait for
        their health check over mutual TLS; ``cluster.json`` gets their new pids (so `down` stops them)."""
        state = self.state
        layout = cluster.Layout(self.root)
        procs = {}
        for site in sites:
            info = state.node(site)
            procs[info.id] = cluster._spawn(cluster.node_command(info.site, self.root), layout.log(info.id),
                                            self.root)
        state = replace(state, nodes=tuple(replace(n, pid=procs[n.id].pid) if n.id in procs else n
                                           for n in state.nodes))
        state.save()
        try:
            asyncio.run(cluster._wait_healthy(state, procs, time.monotonic() + 30, 30))
        finally:
            for p in procs.values():
                p.returncode = 0  # detached like up's: down (or kill) reaps them

    def restore(self) -> None:
        """Restart every node that is down; the KMEs must all still run."""
        state = self.state
        assert all(cluster.is_ours(k.pid, self.root) for k in state.kmes), "a KME died"
        dead = [n.site for n in state.nodes if not cluster.is_ours(n.pid, self.root)]
        if dead:
            self.restart(*dead)

    def client(self, **kw: object) -> QStore:
        kw.setdefault("chunk_size", CHUNK)
        kw.setdefault("node_timeout_s", 10.0)
        return QStore.open(self.root, **kw)

    def call(self, *calls: tuple[str, str, str, object]) -> list[dict]:
        """``(site, method, path, json body)`` on nodes, as the client SAE; each answer's JSON (200 only)."""
        return asyncio.run(node_calls(self.state, calls))


async def node_calls(state: ClusterState, calls) -> list[dict]:
    me = state.sae(CLIENT_SAE)
    ctx = pki.client_ssl_context(me.cert, me.key, state.ca)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
        async def one(site: str, method: str, path: str, body: object) -> dict:
            async with session.request(method, state.node(site).url + path, json=body) as resp:
                assert resp.status == 200, (site, path, resp.status, await resp.text())
                return await resp.json()

        return await asyncio.gather(*(one(*c) for c in calls))


def collect_staging(live: Live, sites=SITES) -> list[dict]:
    """POST /v1/admin/gc with the shortest staging TTL on every node (call > 1 s after the last write)."""
    return live.call(*((s, "POST", "/v1/admin/gc", {"staging_ttl_s": 1}) for s in sites))


def assert_nothing_staged(live: Live, sites=SITES) -> None:
    for site, status in zip(sites, live.call(*((s, "GET", "/v1/status", None) for s in sites)), strict=True):
        assert status["store"]["staging_uploads"] == 0, (site, status["store"])
        assert not live.staged(site), site


def put_bytes(live: Live, name: str, data: bytes, **kw: object) -> dict:
    async def go() -> dict:
        async with live.client(**kw) as qs:
            await qs.create_bucket(BUCKET)
            return (await qs.put(BUCKET, name, data)).to_json()

    return asyncio.run(go())


def get_bytes(live: Live, name: str) -> bytes:
    async def go() -> bytes:
        async with live.client() as qs:
            return await qs.get_bytes(BUCKET, name)

    return asyncio.run(go())


def until_staged(live: Live, put: subprocess.Popen[str], sites: tuple[str, ...]) -> None:
    """Wait until a put has begun its upload on every one of ``sites`` (a new .part in their staging/)."""
    before = {s: live.staged(s) for s in sites}
    deadline = time.monotonic() + 60
    while not all(live.staged(s) - before[s] for s in sites):
        if put.poll() is not None:
            pytest.fail(f"the put ended before it could be interrupted: {finish(put).stderr}")
        assert time.monotonic() < deadline, "the put never began its upload"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("state")
    cluster.up(None, root)  # deploy/local.toml: site1..site5 and a client site, k = 3
    try:
        yield Live(root)
    finally:
        cluster.down(root)


@pytest.fixture
def live(shared):
    shared.restore()
    yield shared
    shared.restore()


# -- the command line ----------------------------------------------------------------------------


def test_cli_round_trip_and_one_line_errors(live, tmp_path):
    state = live.root
    data = os.urandom(3 * (1 << 20) + 123)
    src = tmp_path / "trip.bin"
    src.write_bytes(data)

    put = qstore_ok(state, "put", src, "cli/trip.bin", "--chunk-size", "256K")
    assert put["size"] == len(data) and put["nodes"] == list(SITES) and put["failed"] == {}
    assert put["key_bytes"] >= 5 * len(data)  # one-time pad: at least the data's size per link

    listed, stat = qstore_all(state, ("ls", "cli/", "--json"), ("stat", "cli/trip.bin", "--json"))
    assert listed.returncode == stat.returncode == 0, listed.stderr + stat.stderr
    assert [(o["key"], o["size"]) for o in json.loads(listed.stdout)] == [("cli/trip.bin", len(data))]
    info = json.loads(stat.stdout)
    assert (info["size"], info["version"], info["holders"]) == (len(data), put["version"], list(SITES))
    assert info["chunks"] == -(-len(data) // CHUNK) and info["chunk_size"] == CHUNK

    out = tmp_path / "out" / "trip.bin"
    out.parent.mkdir()
    got = qstore_ok(state, "get", "cli/trip.bin", "-o", out)
    assert out.read_bytes() == data
    assert got["size"] == len(data) and got["verified"] and got["bad"] == {} and got["failed"] == {}
    assert len(got["nodes"]) >= 4  # k + 1: one share more than needed, to check them

    empty = tmp_path / "nowhere"
    empty.mkdir()
    missing_name, missing_file, no_state = map(finish, [
        start(state, "get", "cli/nope.bin", "-o", tmp_path / "out" / "nope.bin"),
        start(state, "put", tmp_path / "missing.bin"), start(empty, "ls")])
    assert_one_line_error(missing_name, "cli/nope.bin")
    assert_one_line_error(missing_file, "missing.bin")
    assert_one_line_error(no_state, "no cluster state", str(empty))
    assert sorted(p.name for p in out.parent.iterdir()) == ["trip.bin"]  # no half-written output


# -- nodes down ----------------------------------------------------------------------------------


def test_n_minus_k_nodes_killed_still_read_byte_exact(live, tmp_path):
    data = os.urandom(5 * CHUNK + 7)
    put_bytes(live, "down/two", data)
    live.kill("site1", "site4")
    out = tmp_path / "two"
    report = qstore_ok(live.root, "get", "down/two", "-o", out)
    assert out.read_bytes() == data
    assert set(report["failed"]) == {"site1", "site4"}
    assert sorted(report["nodes"]) == ["site2", "site3", "site5"]
    assert report["verified"] is False  # only k nodes left: nothing to check against
    live.restart("site1", "site4")
    assert get_bytes(live, "down/two") == data


def test_node_killed_mid_put_full_quorum_fails_lower_quorum_succeeds_and_repair_restores(live, tmp_path):
    state = live.root
    old = os.urandom(100_000)
    put_bytes(live, "mid/obj", old)
    new = os.urandom(8 << 20)
    src = tmp_path / "new.bin"
    src.write_bytes(new)

    # W = n: the put fails naming the site, nothing changes
    put = start(state, "put", src, "mid/obj", "--chunk-size", "256K")
    until_staged(live, put, ("site3",))
    live.kill("site3")
    assert_one_line_error(finish(put), "site3")
    assert get_bytes(live, "mid/obj") == old
    others = tuple(s for s in SITES if s != "site3")
    assert_nothing_staged(live, others)  # the client aborted its upload on the others
    live.restart("site3")
    time.sleep(1.1)
    gc = collect_staging(live, ("site3",))[0]
    assert gc["orphan_files"] >= 1  # the killed node's half-received share: collected
    assert_nothing_staged(live)

    # W = n - 1: the same failure, and the put succeeds on four nodes
    put = start(state, "put", src, "mid/obj", "--chunk-size", "256K", "--write-quorum", "4", "--json")
    until_staged(live, put, ("site3",))
    live.kill("site3")
    res = finish(put)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["nodes"] == list(others) and "site3" in report["failed"]
    assert qstore_ok(state, "stat", "mid/obj")["holders"] == list(others)

    # repair gives the restarted node its share, and that share is good: it reads with two others down
    live.restart("site3")
    (repaired,) = qstore_ok(state, "repair", "site3")
    assert repaired["node"] == "site3" and repaired["failed"] == {}
    assert f"{BUCKET}/mid/obj" in repaired["repaired"]
    assert qstore_ok(state, "stat", "mid/obj")["holders"] == list(SITES)
    live.kill("site1", "site2")
    out = tmp_path / "back.bin"
    got = qstore_ok(state, "get", "mid/obj", "-o", out)
    assert out.read_bytes() == new
    assert "site3" in got["nodes"] and got["bad"] == {}
    live.restart("site1", "site2")
    collect_staging(live, ("site3",))  # what the second kill left there
    assert_nothing_staged(live)


def test_client_killed_mid_put_leaves_nothing_visible_and_gc_collects_staging(live, tmp_path):
    state = live.root
    src = tmp_path / "ghost.bin"
    src.write_bytes(os.urandom(8 << 20))
    put = start(state, "put", src, "ghost/obj", "--chunk-size", "256K")
    until_staged(live, put, SITES)
    put.kill()
    put.wait()
    killed = time.monotonic()
    staged = live.call(*((s, "GET", "/v1/status", None) for s in SITES))
    assert sum(s["store"]["staging_uploads"] for s in staged) >= 1  # something half-sent, to collect

    listed, stat = qstore_all(state, ("ls", "ghost/", "--json"), ("stat", "ghost/obj"))
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr
    assert_one_line_error(stat, "ghost/obj")

    time.sleep(max(0.0, killed + 1.1 - time.monotonic()))
    reports = collect_staging(live)
    assert sum(r["stale_uploads"] for r in reports) >= 1
    assert_nothing_staged(live)


def test_bit_rot_in_one_share_file_is_corrected_reported_and_repaired(live, tmp_path):
    data = os.urandom(4 * CHUNK)
    put = put_bytes(live, "rot/obj", data)
    (path,) = (live.data("site2") / "objects").glob(f"{put['object_id']}-{put['version']:016x}-*.shares")
    raw = bytearray(path.read_bytes())
    for offset in range(1000, len(raw), CHUNK // 2):  # every chunk's share
        raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))

    out = tmp_path / "rot.bin"
    report = qstore_ok(live.root, "get", "rot/obj", "-o", out)
    assert out.read_bytes() == data
    # site2 was caught when asked (k + 1 reads); never served a share that counted
    assert "site2" in report["bad"] or "site2" not in report["nodes"]
    if "site2" in report["bad"]:
        assert "site2" not in report["nodes"]

    (repaired,) = qstore_ok(live.root, "repair", "site2")
    assert repaired["repaired"] == [f"{BUCKET}/rot/obj"] and repaired["failed"] == {}
    (scrub,) = live.call(("site2", "POST", "/v1/admin/scrub", None))
    assert scrub["bad"] == [] and scrub["chunks_checked"] >= 4
    assert get_bytes(live, "rot/obj") == data


# -- the wire ------------------------------------------------------------------------------------


async def _fetch(url: str, ctx: ssl.SSLContext) -> int:
    connector = aiohttp.TCPConnector(ssl=ctx, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s, asyncio.timeout(10), s.get(url) as resp:
        return resp.status


def test_wrong_certificates_are_refused_by_node_and_kme_processes(live, tmp_path):
    state = live.state
    me = state.sae(CLIENT_SAE)
    rogue = pki.create_ca(tmp_path / "rogue")
    fake = pki.issue(rogue, CLIENT_SAE, tmp_path / "rogue")
    urls = [state.node("site1").url + "/v1/health", state.kme_url_of(CLIENT_SAE) + "/health"]

    async def go() -> None:
        good = pki.client_ssl_context(me.cert, me.key, state.ca)
        assert [await _fetch(url, good) for url in urls] == [200, 200]
        anonymous = ssl.create_default_context(cafile=str(state.ca))
        for ctx in (pki.client_ssl_context(fake.cert, fake.key, state.ca),  # another CA's client
                    anonymous,  # no client certificate
                    pki.client_ssl_context(me.cert, me.key, rogue.cert_path)):  # servers of another CA
            for url in urls:
                with pytest.raises(aiohttp.ClientError):
                    await _fetch(url, ctx)

    asyncio.run(go())


def test_replayed_and_tampered_envelopes_are_refused_by_a_node_process(live):
    captured = []

    async def go() -> None:
        async with live.client() as qs:
            await qs.create_bucket(BUCKET)
            node = next(nd for nd in qs._nodes if nd.site == "site1")
            real = node.call

            async def spy(method, path, **kw):
                if path.endswith(("/chunks", "/oneshot")):
                    captured.append((path, kw["data"], kw.get("headers"), kw.get("params")))
                return await real(method, path, **kw)

            node.call = spy
            await qs.put(BUCKET, "wire/obj", b"hello" * 100)
        state = live.state
        me = state.sae(CLIENT_SAE)
        ctx = pki.client_ssl_context(me.cert, me.key, state.ca)
        base = state.node("site1").url
        upload = "/v1/uploads/" + "ab" * 16
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
            async with s.post(base + "/v1/uploads", json={
                    "upload_id": "ab" * 16, "bucket": BUCKET, "key": "wire/evil", "object_id": "cd" * 16,
                    "version": 1, "x": 1, "k": 3, "n": 5}) as r:
                assert r.status == 200
            path, envelope, headers, params = captured[0]
            async with s.put(base + path, data=envelope, headers=headers, params=params) as r:  # its upload
                assert r.status in (403, 404, 409)
            async with s.put(base + upload + "/chunks", data=envelope) as r:  # replayed into a new one
                assert r.status == 403 and (await r.json())["error"] == "SealError"
            tampered = bytearray(envelope)
            tampered[-20] ^= 1
            async with s.put(base + upload + "/chunks", data=bytes(tampered)) as r:
                assert r.status in (403, 409)
            async with s.delete(base + upload) as r:
                assert r.status == 204

    asyncio.run(go())
    assert get_bytes(live, "wire/obj") == b"hello" * 100
    assert_nothing_staged(live, ("site1",))


# -- an empty key pool ---------------------------------------------------------------------------

DRY = """\
# Two storage sites (k = n = 2) and a client site; the client's link to site a
# holds 512 KiB of key and makes no more.
[cluster]
name = "dry"
k = 2

[[sites]]
name = "a"
[[sites]]
name = "b"
[[sites]]
name = "desk"
node = false

[[links]]
a = "desk"
b = "a"
rate_bps = 0
capacity_bits = 4194304
[[links]]
a = "desk"
b = "b"
rate = "unlimited"
"""


def test_an_empty_key_pool_waits_its_deadline_then_fails_naming_the_link(tmp_path):
    config = tmp_path / "dry.toml"
    config.write_text(DRY)
    root = tmp_path / "state"
    small = tmp_path / "small"
    small.write_bytes(b"s" * 20_000)
    try:
        # as a user would: `qstore cluster up CONFIG` and `qstore put` (which creates the bucket)
        up = finish(start(root, "cluster", "up", config))
        assert up.returncode == 0, up.stderr
        put = qstore_ok(root, "put", small)
        assert put["nodes"] == ["a", "b"] and put["size"] == 20_000  # fits in the pool
        dry = Live(root)
        wait_s = 1.5

        async def go() -> float:
            async with dry.client(key_wait_s=wait_s, chunk_size=64 << 10) as qs:
                began = time.monotonic()
                with pytest.raises(KeySupplyExhausted) as exc:
                    await qs.put(BUCKET, "big", os.urandom(1 << 20))  # does not
                waited = time.monotonic() - began
                assert "kme.desk → kme.a" in str(exc.value) and "kme.b" not in str(exc.value)
                with pytest.raises(NoSuchKey):
                    await qs.head(BUCKET, "big")
                assert [i.key for i in await qs.list(BUCKET)] == ["small"]
                assert await qs.get_bytes(BUCKET, "small") == b"s" * 20_000
                return waited

        assert asyncio.run(go()) >= wait_s
        sites = ("a", "b")
        assert_nothing_staged(dry, sites)  # the client aborted what it had begun
        time.sleep(1.1)
        collect_staging(dry, sites)
        assert_nothing_staged(dry, sites)
    finally:
        cluster.down(root)


def test_a_restarted_node_still_takes_part_in_queries(live):
    """MPC round messages announce the keys they were sealed with, and the receiving node fetches them
    ahead; a node that restarts has lost those, so the senders seal again under fresh key, once."""
    ages = [20 + (7 * i) % 60 for i in range(40)]
    csv = "age\n" + "".join(f"{a}\n" for a in ages)
    schema = '[columns]\nage = { type = "integer", min = 0, max = 120 }\n'

    async def put() -> None:
        async with live.client() as qs:
            await qs.tables().put("restart_ages", csv, schema)

    async def mean() -> float:
        async with live.client() as qs:
            return float((await qs.table("restart_ages").mean("age")).value)

    asyncio.run(put())
    for _ in range(3):  # the pools fill, and their keys are announced and fetched ahead
        assert asyncio.run(mean()) == pytest.approx(sum(ages) / len(ages))
    live.kill("site2")
    live.restart("site2")
    assert asyncio.run(mean()) == pytest.approx(sum(ages) / len(ages))
