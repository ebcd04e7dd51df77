"""Key delivery throughput and request rate of the simulated KMEs (ETSI GS QKD 014 over mutual TLS).

Setup: a development CA and certificates from :mod:`qkd_sim.pki` in a temporary directory; two
real KME servers on 127.0.0.1 (KME_A with SAE a1, KME_B with SAE b1, one link between them of
unlimited rate, so no request ever waits for key), each in its own child process by default
(``--kmes inline``: both in this process's event loop instead, as in the tests). The SAEs are
:class:`qkd_sim.sae.SAEClient` instances of this process (keep-alive TLS 1.3 connections with
client certificates, :class:`qkd_sim.https_pool.HTTPSPool`), so every figure includes strict
parsing of the answers and the base64 decoding of every key on the client side.

What it measures:

* ``key_delivery``: MB/s of key for ``enc_keys`` (a1 at KME_A) followed by ``dec_keys`` (b1
  at KME_B) of the same keys, for 1 KiB keys (128 per request, ``--total-small`` of key per
  timed run, default 32 MiB) and 1 MiB keys (16 per request, ``--total`` per run, default
  128 MiB; 2 per request with ``--quick``). Each key byte is counted once, although it is
  delivered to both SAEs (so it crosses TLS twice, base64-encoded). The keys b1 receives are
  checked to equal those a1 received. ``concurrency`` > 1: that many such enc→dec pipelines
  run at once (the key total is split between them);
* ``request_rate``: requests/s for small requests, ``get_status`` and ``enc_keys`` of one
  256-bit key, sequential and with 16 concurrent requests (one session, so up to 16
  keep-alive TLS connections);
* ``transport_bound``: the same traffic as the sequential 1 MiB figure (a 16-key ``enc_keys``
  at KME_A, then one at KME_B), received by the SAEs' connection pools and thrown away: no
  Key container parsing, no base64 decoding. What the KMEs, TLS and the event loops cost
  without the SAE's own work, so the bound of the figure above;
* ``target``: the sequential enc+dec MB/s of 1 MiB keys against the 300 MB/s goal.

How it runs: each KME in its own process (as deployed), the SAEs in this one. The KMEs
stream each Key container in 1 MiB pieces (256 KiB at its start and in its last 2 MiB); the SAEs
decrypt TLS straight into a 1 MiB buffer per connection and decode the base64 from there as it
arrives (:class:`qkd_sim.etsi014.KeyContainerReader`), by :mod:`qstore.b64` (the backend is in the
environment line); both kinds of process keep 64 MiB of freed heap
(:func:`qstore._memory.keep_freed_heap`).

MB/s is key bytes / seconds with 1 MB = 10^6 bytes. Every measurement runs once untimed
(warm-up: TLS handshakes, first allocations) and then the best of 5 timed runs is reported (this
VM's neighbours take a fifth to a third of it away for seconds at a time).
Output: one JSON object per line on stdout (the first describes the environment); progress
goes to stderr.

Run::

    python bench/kme.py                    # 128 MiB of key per size and run, KMEs in child processes
    python bench/kme.py --quick            # small sizes, for a smoke test (a few seconds)
    python bench/kme.py --kmes inline      # KMEs in the benchmark's own event loop
    python bench/kme.py --total 256MiB
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import ssl
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from _common import cpu_model, emit, log, mbps, parse_size, pkg_version

from qkd_sim import kme, pki
from qkd_sim.https_pool import HTTPSPool
from qkd_sim.pool import LinkConfig
from qkd_sim.sae import SAEClient, SAEConfig
from qstore import b64
from qstore._memory import HEAP_KEPT_BYTES, keep_freed_heap

KiB = 1024
MiB = 1024 * KiB
REPEATS = 5
TARGET_MBPS = 300
KMES = {"KME_A": ("a1", "KME_B"), "KME_B": ("b1", "KME_A")}  # KME: (its SAE, its peer)
DIRECTORY = {"a1": "KME_A", "b1": "KME_B"}
SEED_FILE = "link.seed"
# (key bytes, keys per request, concurrent enc→dec pipelines)
DELIVERY = ((1 * KiB, 128, 1), (1 * MiB, 16, 1), (1 * MiB, 16, 4))
SMALL_KEY_BITS = 256
CONCURRENCY = 16


async def best_of(fn: Callable[[], Awaitable[object]], repeats: int = REPEATS) -> float:
    """Await ``fn()`` once untimed (warm-up), then return the best time of ``repeats`` runs."""
    await fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        await fn()
        best = min(best, time.perf_counter() - t0)
    return best





# ----------------------------------------------------------------------------- the cluster


def make_pki(root: Path) -> dict[str, pki.Identity]:
    """CA, KME and SAE certificates in ``root``; the link seed in ``root/link.seed``."""
    ca = pki.create_ca(root / "ca")
    ids = {sae: pki.issue(ca, sae, root / "certs") for sae, _ in KMES.values()}
    for name in KMES:
        ids[name] = pki.issue(ca, name, root / "certs", kind="kme")
    fd = os.open(root / SEED_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, os.urandom(32))
    finally:
        os.close(fd)
    return ids


def kme_config(name: str, root: Path) -> kme.KMEConfig:
    """The config of KME ``name`` (one SAE, one unlimited link to the other KME)."""
    sae, peer = KMES[name]
    certs = root / "certs"
    return kme.KMEConfig(
        kme_id=name, saes=frozenset({sae}), directory=DIRECTORY,
        links=(LinkConfig(peer=peer, seed=(root / SEED_FILE).read_bytes()),),
        cert=certs / f"{name}.pem", key=certs / f"{name}.key", ca=root / "ca" / "ca.pem",
    )


async def serve_child(name: str, root: Path) -> None:
    """Child mode: run KME ``name``, print its URL as one JSON line, stop when stdin closes."""
    running = await kme.start(kme_config(name, root))
    print(json.dumps({"kme": name, "url": running.url, "pid": os.getpid()}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()  # EOF: the parent is done (or gone)
    await running.close()


class Cluster:
    """KME_A and KME_B, in child processes or in this event loop; ``urls`` by KME ID."""

    def __init__(self, root: Path, mode: str):
        self.root = root
        self.mode = mode
        self.urls: dict[str, str] = {}
        self._inline: list[kme.RunningKME] = []
        self._children: list[asyncio.subprocess.Process] = []

    async def __aenter__(self) -> Cluster:
        try:
            if self.mode == "inline":
                for name in KMES:
                    running = await kme.start(kme_config(name, self.root))
                    self._inline.append(running)
                    self.urls[name] = running.url
            else:
                urls = await asyncio.gather(*(self._spawn(name) for name in KMES))
                self.urls.update(zip(KMES, urls, strict=True))
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _spawn(self, name: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--serve", name, "--dir", str(self.root),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        self._children.append(proc)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=60)
        if not line:
            raise SystemExit(f"KME {name} did not start (exit status {await proc.wait()})")
        return json.loads(line)["url"]

    async def close(self) -> None:
        for running in self._inline:
            await running.close()
        self._inline.clear()
        for proc in self._children:
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()
        for proc in self._children:
            try:
                await asyncio.wait_for(proc.wait(), timeout=10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        self._children.clear()


def sae_client(ids: dict[str, pki.Identity], sae: str, url: str) -> SAEClient:
    ident = ids[sae]
    return SAEClient(SAEConfig(sae_id=sae, kme_url=url, cert=ident.cert, key=ident.key, ca=ident.ca))


async def tls_info(ident: pki.Identity, url: str) -> dict[str, Any]:
    """Check /health at ``url`` over mTLS; the protocol and cipher such a connection negotiates."""
    ctx = pki.client_ssl_context(ident.cert, ident.key, ident.ca)
    async with (aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
                session.get(f"{url}/health") as resp):
        if resp.status != 200:
            raise SystemExit(f"{url}/health answered {resp.status}")
        await resp.read()
    host, port = url.removeprefix("https://").rsplit(":", 1)
    _, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
    try:
        sslobj = writer.get_extra_info("ssl_object")
        cipher = writer.get_extra_info("cipher")
        return {"tls": sslobj.version() if sslobj is not None else None,
                "cipher": cipher[0] if cipher else None}
    finally:
        writer.close()
        await writer.wait_closed()


def environment(mode: str, total: int, small_total: int, tls: dict[str, Any]) -> dict[str, Any]:
    return {
        "figure": "environment",
        "python": platform.python_version(),
        "aiohttp": pkg_version("aiohttp"),
        "cryptography": pkg_version("cryptography"),
        "numpy": pkg_version("numpy"),
        "openssl": ssl.OPENSSL_VERSION,
        **tls,
        "kmes": mode,
        "client": "qkd_sim.sae.SAEClient (qkd_sim.https_pool) in the benchmark process",
        "base64": b64.default_backend(),
        "heap_kept_bytes": HEAP_KEPT_BYTES if keep_freed_heap() else 0,
        "cpu_model": cpu_model(),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "key_bytes_per_run": {"1KiB_keys": small_total, "1MiB_keys": total},
        "repeats": f"1 untimed + best of {REPEATS}",
    }


# ----------------------------------------------------------------------------- measurements


async def bench_delivery(a1: SAEClient, b1: SAEClient, key_bytes: int, per_request: int, concurrency: int,
                         total: int) -> dict[str, Any]:
    """enc_keys at KME_A then dec_keys at KME_B of the same keys, ``total`` key bytes per run."""
    requests = max(concurrency, -(-total // (key_bytes * per_request)))
    requests -= requests % concurrency
    nbytes = requests * per_request * key_bytes

    async def pipeline(count: int) -> None:
        for _ in range(count):
            sent = await a1.get_enc_keys("b1", per_request, 8 * key_bytes)
            got = await b1.get_dec_keys("a1", [k.key_id for k in sent])
            if got != sent:
                raise SystemExit("b1 received other keys than a1")

    async def run() -> None:
        await asyncio.gather(*(pipeline(requests // concurrency) for _ in range(concurrency)))

    log(f"enc_keys + dec_keys: {requests} x {per_request} x {key_bytes} B keys, concurrency {concurrency}")
    seconds = await best_of(run)
    return {
        "figure": "key_delivery",
        "what": "enc_keys (a1 at KME_A) + dec_keys (b1 at KME_B)",
        "key_bytes": key_bytes,
        "keys_per_request": per_request,
        "concurrency": concurrency,
        "request_pairs": requests,
        "key_MiB": round(nbytes / MiB, 3),
        "seconds": round(seconds, 3),
        "MBps": mbps(nbytes, seconds),
        "keys_per_s": round(requests * per_request / seconds, 1),
    }


async def bench_transport(ids: dict[str, pki.Identity], urls: dict[str, str], per_request: int,
                          total: int) -> dict[str, Any]:
    """A 1 MiB-key enc_keys at KME_A then one at KME_B, bodies received and discarded."""
    key_bytes = MiB
    requests = max(1, -(-total // (key_bytes * per_request)))
    body = json.dumps({"number": per_request, "size": 8 * key_bytes}).encode()
    pools = {}
    for sae, kme_id in (("a1", "KME_A"), ("b1", "KME_B")):
        ident = ids[sae]
        pools[sae] = HTTPSPool(urls[kme_id], pki.client_ssl_context(ident.cert, ident.key, ident.ca))

    def discard(buf: bytearray, start: int, end: int) -> None:
        return None

    async def fetch(sae: str, kme_id: str, peer: str) -> None:
        answer = await pools[sae].request("POST", f"/api/v1/keys/{peer}/enc_keys", body=body,
                                          headers=[("Content-Type", "application/json")],
                                          limit=per_request * 2 * key_bytes, sink=discard)
        if answer.status != 200:
            raise SystemExit(f"enc_keys at {kme_id} answered {answer.status}")

    async def run() -> None:
        for _ in range(requests):
            await fetch("a1", "KME_A", "b1")
            await fetch("b1", "KME_B", "a1")

    log(f"transport bound: {requests} x 2 x {per_request} x {key_bytes} B keys, bodies discarded")
    try:
        seconds = await best_of(run)
    finally:
        for pool in pools.values():
            await pool.close()
    nbytes = requests * per_request * key_bytes
    return {
        "figure": "transport_bound",
        "what": "enc_keys at KME_A + enc_keys at KME_B, bodies received and discarded (no parsing)",
        "key_bytes": key_bytes,
        "keys_per_request": per_request,
        "request_pairs": requests,
        "key_MiB": round(nbytes / MiB, 3),
        "seconds": round(seconds, 3),
        "MBps": mbps(nbytes, seconds),
    }


async def bench_rate(what: str, call: Callable[[], Awaitable[object]], requests: int,
                     concurrency: int) -> dict[str, Any]:
    """Requests/s of ``call`` made ``requests`` times, ``concurrency`` at once."""
    per_worker = max(1, requests // concurrency)

    async def worker() -> None:
        for _ in range(per_worker):
            await call()

    async def run() -> None:
        await asyncio.gather(*(worker() for _ in range(concurrency)))

    log(f"{what}: {per_worker * concurrency} requests, concurrency {concurrency}")
    seconds = await best_of(run)
    count = per_worker * concurrency
    return {
        "figure": "request_rate",
        "what": what,
        "concurrency": concurrency,
        "requests": count,
        "seconds": round(seconds, 3),
        "rps": round(count / seconds, 1),
        "ms_per_request": round(1000 * seconds / count * concurrency, 3),
    }


async def run_bench(args: argparse.Namespace) -> int:
    total: int = args.total or (8 * MiB if args.quick else 128 * MiB)
    small_total: int = args.total_small or (1 * MiB if args.quick else 32 * MiB)
    requests = 96 if args.quick else 1000
    with tempfile.TemporaryDirectory(prefix="qstore-bench-kme-") as tmp:
        root = Path(tmp)
        log("certificates")
        ids = make_pki(root)
        log(f"starting KME_A and KME_B ({args.kmes})")
        async with Cluster(root, args.kmes) as cluster:
            tls = await tls_info(ids["a1"], cluster.urls["KME_A"])
            emit(environment(args.kmes, total, small_total, tls))
            async with sae_client(ids, "a1", cluster.urls["KME_A"]) as a1, \
                    sae_client(ids, "b1", cluster.urls["KME_B"]) as b1:
                target = None
                for key_bytes, per_request, concurrency in DELIVERY:
                    if args.quick and key_bytes >= MiB:
                        per_request = 2
                    size_total = total if key_bytes >= MiB else small_total
                    record = await bench_delivery(a1, b1, key_bytes, per_request, concurrency, size_total)
                    emit(record)
                    if key_bytes == MiB and concurrency == 1:
                        target = record["MBps"]
                emit(await bench_transport(ids, cluster.urls, 2 if args.quick else 16, total))

                for concurrency in (1, CONCURRENCY):
                    emit(await bench_rate("status", lambda: a1.get_status("b1"), requests, concurrency))
                for concurrency in (1, CONCURRENCY):
                    emit(await bench_rate(f"enc_keys 1 x {SMALL_KEY_BITS}-bit key",
                                          lambda: a1.get_enc_keys("b1", 1, SMALL_KEY_BITS),
                                          requests, concurrency))
        assert target is not None
        emit({"figure": "target", "what": "enc+dec 1 MiB keys MB/s", "value": target,
              "target": TARGET_MBPS, "met": target >= TARGET_MBPS})
    log("done")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--total", type=parse_size, default=None,
                        help="key bytes per timed run of 1 MiB keys (default 128MiB; 8MiB quick)")
    parser.add_argument("--total-small", type=parse_size, default=None,
                        help="key bytes per timed run of 1 KiB keys (default 32MiB; 1MiB quick)")
    parser.add_argument("--kmes", choices=("process", "inline"), default="process",
                        help="KMEs each in a child process (default) or in this event loop")
    parser.add_argument("--serve", metavar="KME_ID", choices=sorted(KMES), help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        if args.dir is None:
            parser.error("--serve needs --dir")
        asyncio.run(serve_child(args.serve, args.dir))
        return 0
    return asyncio.run(run_bench(args))


if __name__ == "__main__":
    sys.exit(main())
