"""S3 gateway throughput: large objects through the gateway vs the client library, small objects vs moto.

One run starts a local cluster (`client.cluster.up`, deploy/local.toml, with its gateway) and moto's
S3 server on this machine, then prints JSON lines:
  - large: PUT and GET of --size bytes with boto3 (multipart in --part-size parts, boto3's default
    concurrency) through the gateway, and the same bytes with the client library (QStore) directly,
    to the same cluster, on the same kind of event loop as the gateway (uvloop when installed);
    ratio = gateway / library (target >= 0.8);
  - small: --count objects of 4 KiB, PUT then GET, one after another, against the gateway and against
    moto's server; ratio = gateway / moto ops/s (target >= 0.5). The client library's own ops/s for the
    same objects is printed beside them: what the gateway cannot exceed.
Each figure is the median of --repeat rounds, the gateway's and its reference's runs interleaved so that
a machine busy with other work slows both alike; every round's figures are in the line too.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _common import MiB, emit, log, mbps, parse_size

SMALL = 4096

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _client(url: str, key: str, secret: str):  # type: ignore[no-untyped-def]
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=url, aws_access_key_id=key, aws_secret_access_key=secret,
                        region_name="us-east-1", config=Config(retries={"max_attempts": 0},
                                                               s3={"addressing_style": "path"}))


def _moto(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=(tmp / "moto.log").open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/")
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)


def _small(s3, bucket: str, count: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    s3.create_bucket(Bucket=bucket)
    body = os.urandom(SMALL)
    started = time.perf_counter()
    for i in range(count):
        s3.put_object(Bucket=bucket, Key=f"small/{i:06d}", Body=body)
    put = count / (time.perf_counter() - started)
    started = time.perf_counter()
    for i in range(count):
        s3.get_object(Bucket=bucket, Key=f"small/{i:06d}")["Body"].read()
    get = count / (time.perf_counter() - started)
    return {"put_ops": round(put, 1), "get_ops": round(get, 1)}


async def _library(root: Path, data: bytes) -> tuple[float, float]:
    from client.storage import QStore

    async with QStore.open(root) as store:
        await store.create_bucket("benchlib")
        started = time.perf_counter()
        await store.put("benchlib", "large", data)
        put = time.perf_counter() - started
        sink = io.BytesIO()
        started = time.perf_counter()
        await store.get("benchlib", "large", sink)
        return put, time.perf_counter() - started


async def _library_small(root: Path, bucket: str, count: int) -> dict[str, float]:
    from client.storage import QStore

    body = os.urandom(SMALL)
    async with QStore.open(root) as store:
        await store.create_bucket(bucket)
        started = time.perf_counter()
        for i in range(count):
            await store.put(bucket, f"small/{i:06d}", body)
        put = count / (time.perf_counter() - started)
        started = time.perf_counter()
        for i in range(count):
            await store.get_bytes(bucket, f"small/{i:06d}")
        get = count / (time.perf_counter() - started)
    return {"put_ops": round(put, 1), "get_ops": round(get, 1)}


def _run(coro):  # type: ignore[no-untyped-def]
    """On the event loop the gateway and `qstore put/get` use (uvloop when installed), for like with like."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=parse_size, default=1024 * MiB)
    ap.add_argument("--part-size", type=parse_size, default=16 * MiB)
    ap.add_argument("--count", type=int, default=1000, help="small objects (4 KiB)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of each measurement (the median is shown)")
    ap.add_argument("--quick", action="store_true", help="32 MiB, 50 small objects, one round (smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.size, args.count, args.repeat = 32 * MiB, 50, 1
    from boto3.s3.transfer import TransferConfig

    from client import cluster

    with tempfile.TemporaryDirectory(prefix="qstore-bench-s3-") as tmp_name:
        tmp = Path(tmp_name)
        root = tmp / "state"
        log("starting the cluster and moto's server")
        state = cluster.up(None, root)
        moto, moto_url = _moto(tmp)
        try:
            gw = cluster.gateway_of(state)
            assert gw is not None
            s3 = _client(gw["url"], gw["access_key"], gw["secret_key"])
            moto_s3 = _client(moto_url, "testing", "testing")
            try:
                import uvloop
                loop = f"uvloop {uvloop.__version__}"
            except ImportError:
                loop = "asyncio"
            emit({"bench": "s3", "size_bytes": args.size, "part_bytes": args.part_size,
                  "small_count": args.count, "repeat": args.repeat, "event_loop": loop, "gateway": gw["url"]})
            data = os.urandom(args.size)
            src = tmp / "large.bin"
            src.write_bytes(data)
            out = tmp / "large.out"
            cfg = TransferConfig(multipart_threshold=args.part_size, multipart_chunksize=args.part_size)
            s3.create_bucket(Bucket="bench")
            rounds: dict[str, list[float]] = {k: [] for k in ("gw_put", "gw_get", "lib_put", "lib_get")}
            for r in range(args.repeat):
                log(f"large object, round {r + 1}: {args.size >> 20} MiB, gateway then library")
                started = time.perf_counter()
                s3.upload_file(str(src), "bench", "large", Config=cfg)
                rounds["gw_put"].append(time.perf_counter() - started)
                started = time.perf_counter()
                s3.download_file("bench", "large", str(out), Config=cfg)
                rounds["gw_get"].append(time.perf_counter() - started)
                if out.read_bytes() != data:
                    raise RuntimeError("the gateway returned other bytes")
                out.unlink()
                lib_put, lib_get = _run(_library(root, data))
                rounds["lib_put"].append(lib_put)
                rounds["lib_get"].append(lib_get)
            for op in ("put", "get"):
                g, lib = rounds[f"gw_{op}"], rounds[f"lib_{op}"]
                emit({"figure": f"large_{op}", "gateway_mbps": mbps(args.size, statistics.median(g)),
                      "library_mbps": mbps(args.size, statistics.median(lib)),
                      "ratio": _median([b / a for a, b in zip(g, lib, strict=True)]),
                      "rounds_gateway_mbps": [mbps(args.size, t) for t in g],
                      "rounds_library_mbps": [mbps(args.size, t) for t in lib]})
            small: dict[str, list[dict[str, float]]] = {"gateway": [], "moto": [], "library": []}
            for r in range(args.repeat):
                log(f"small objects, round {r + 1}: {args.count} x 4 KiB, gateway, moto, library")
                small["gateway"].append(_small(s3, f"small{r}", args.count))
                small["moto"].append(_small(moto_s3, f"small{r}", args.count))
                small["library"].append(_run(_library_small(root, f"smalllib{r}", args.count)))
            for op in ("put", "get"):
                ours, theirs, lib = ([x[f"{op}_ops"] for x in small[who]]
                                     for who in ("gateway", "moto", "library"))
                emit({"figure": f"small_{op}", "gateway_ops": _median(ours), "moto_ops": _median(theirs),
                      "library_ops": _median(lib),
                      "ratio": _median([a / b for a, b in zip(ours, theirs, strict=True)]),
                      "library_ratio": _median([a / b for a, b in zip(lib, theirs, strict=True)]),
                      "rounds_gateway_ops": ours, "rounds_moto_ops": theirs, "rounds_library_ops": lib})
        finally:
            moto.terminate()
            moto.wait(timeout=10)
            cluster.down(root)


if __name__ == "__main__":
    main()
