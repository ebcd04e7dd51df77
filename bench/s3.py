"""S3 gateway throughput: large objects through the gateway vs the client library, small objects vs moto.

One run starts a local cluster (`client.cluster.up`, deploy/local.toml, with its gateway) and moto's
S3 server on this machine, then prints JSON lines:
  - large: PUT and GET of --size bytes with boto3 (multipart in --part-size parts, boto3's default
    concurrency) through the gateway, and the same size with the client library (QStore) directly;
    ratio = gateway / library (target >= 0.8);
  - small: --count objects of 4 KiB, PUT then GET, one after another, against the gateway and against
    moto's server; ratio = gateway / moto ops/s (target >= 0.5).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _common import MiB, emit, log, mbps, parse_size

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
    body = os.urandom(4096)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=parse_size, default=1024 * MiB)
    ap.add_argument("--part-size", type=parse_size, default=16 * MiB)
    ap.add_argument("--count", type=int, default=1000, help="small objects (4 KiB)")
    ap.add_argument("--quick", action="store_true", help="32 MiB and 50 small objects: a smoke test")
    args = ap.parse_args()
    if args.quick:
        args.size, args.count = 32 * MiB, 50
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
            emit({"bench": "s3", "size_bytes": args.size, "part_bytes": args.part_size,
                  "small_count": args.count, "gateway": gw["url"]})
            data = os.urandom(args.size)
            src = tmp / "large.bin"
            src.write_bytes(data)
            cfg = TransferConfig(multipart_threshold=args.part_size, multipart_chunksize=args.part_size)
            s3.create_bucket(Bucket="bench")
            log(f"large object: {args.size >> 20} MiB through the gateway")
            started = time.perf_counter()
            s3.upload_file(str(src), "bench", "large", Config=cfg)
            gw_put = time.perf_counter() - started
            out = tmp / "large.out"
            started = time.perf_counter()
            s3.download_file("bench", "large", str(out), Config=cfg)
            gw_get = time.perf_counter() - started
            if out.read_bytes() != data:
                raise RuntimeError("the gateway returned other bytes")
            out.unlink()
            log("large object: the client library")
            lib_put, lib_get = asyncio.run(_library(root, data))
            for op, g, lib in (("put", gw_put, lib_put), ("get", gw_get, lib_get)):
                emit({"figure": f"large_{op}", "gateway_mbps": mbps(args.size, g),
                      "library_mbps": mbps(args.size, lib), "ratio": round(lib / g, 3)})
            log(f"small objects: {args.count} x 4 KiB, gateway and moto")
            ours = _small(s3, "small", args.count)
            theirs = _small(_client(moto_url, "testing", "testing"), "small", args.count)
            for op in ("put", "get"):
                mine, moto_ops = ours[f"{op}_ops"], theirs[f"{op}_ops"]
                emit({"figure": f"small_{op}", "gateway_ops": mine, "moto_ops": moto_ops,
                      "ratio": round(mine / moto_ops, 3)})
        finally:
            moto.terminate()
            moto.wait(timeout=10)
            cluster.down(root)


if __name__ == "__main__":
    main()
