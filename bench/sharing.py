"""Throughput and memory benchmark of Shamir sharing (qstore.sharing) against baselines.

What it measures, all in one run on the same random data (os.urandom):

* ``split`` and ``combine`` MB/s of :mod:`qstore.sharing` for (k, n) = (2, 3), (3, 5), (5, 9),
  randomness included (the default AES-CTR generator, re-keyed per call), in two modes:

  - ``chunked-4MiB``: the system's data path, the data processed 4 MiB at a time; split with
    ``split_into`` into one reused out buffer, combine with ``interpolate`` of k shares per
    chunk into one reused row (x = {2, 4, 5} for (3, 5), the last k shares otherwise);
  - ``oneshot``: ``split(data)`` / ``combine(shares)`` on the whole buffer.

* ``zfec_encode``: ``zfec.Encoder(k, n).encode(blocks)`` MB/s on the same data and modes (the
  input cut into k equal blocks, the last one zero-padded; blocks are cut before timing);
* ``ratio`` lines: split/zfec_encode (target 2.0 for (3, 5)) and combine/zfec_encode (target
  4.0 for (3, 5)), and split/pycryptodome_shamir;
* ``pycryptodome_shamir_split``: ``Crypto.Protocol.SecretSharing.Shamir.split(3, 5, block)``
  on 16-byte blocks (1 MiB, or fewer blocks extrapolated when that would exceed ~20 s);
* ``split_stream_peak_rss``: peak RSS and throughput of ``split_stream`` (3, 5) of a 1 GiB
  file into 5 share files, measured in a child process (``ru_maxrss``).

MB/s is input (data) bytes / seconds with 1 MB = 10^6 bytes. Every measured operation runs
once untimed (JIT compilation, first touch of memory) and then the best of 3 timed runs is
reported. Output: one JSON object per line on stdout (the first describes the environment);
progress goes to stderr.

Run::

    python bench/sharing.py                 # 64 MiB of data, 1 GiB file for the RSS figure
    python bench/sharing.py --quick         # small sizes, for a smoke test
    python bench/sharing.py --size 256MiB --backend numpy --skip-rss
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from _common import cpu_model, emit, log, mbps, parse_size, pkg_version

from qstore import linmap, sharing

MiB = 1024 * 1024
CHUNK = 4 * MiB
CHUNK_MODE = "chunked-4MiB"
ONESHOT = "oneshot"
KN = ((2, 3), (3, 5), (5, 9))
TARGET_KN = (3, 5)
SPLIT_TARGET = 2.0
COMBINE_TARGET = 4.0
RSS_TARGET_MIB = 256
SHAMIR_BASELINE_BLOCKS = 65536  # 1 MiB of 16-byte secrets
SHAMIR_BASELINE_BUDGET_S = 20.0
REPEATS = 3


def best_of(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    """Run ``fn`` once untimed (warm-up), then return the best time of ``repeats`` runs."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best





def cpu_flags(wanted: tuple[str, ...] = ("aes", "vaes", "avx2", "avx512f", "avx512bw", "gfni")) -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in flags]
    except OSError:
        pass
    return []


def environment(backend: str, size: int) -> dict[str, Any]:
    return {
        "figure": "environment",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "llvmlite": pkg_version("llvmlite"),
        "zfec": pkg_version("zfec"),
        "pycryptodome": pkg_version("pycryptodome"),
        "cryptography": pkg_version("cryptography"),
        "backend": backend,
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "data_bytes": size,
        "chunk_bytes": CHUNK,
        "repeats": f"1 untimed + best of {REPEATS}",
    }


def chunk_bounds(size: int) -> list[tuple[int, int]]:
    return [(lo, min(size, lo + CHUNK)) for lo in range(0, size, CHUNK)]


def combine_xs(k: int, n: int) -> tuple[int, ...]:
    return (2, 4, 5) if (k, n) == (3, 5) else tuple(range(n - k + 1, n + 1))


# ----------------------------------------------------------------------------- qstore


def bench_split(data: bytes, k: int, n: int, backend: str) -> dict[str, float]:
    size = len(data)
    view = memoryview(data)
    bounds = chunk_bounds(size)
    outs = {hi - lo: linmap.empty_rows(n, hi - lo) for lo, hi in bounds}  # one reused buffer per size

    def chunked() -> None:
        for lo, hi in bounds:
            sharing.split_into(view[lo:hi], n, k, outs[hi - lo], backend=backend)  # type: ignore[arg-type]

    def oneshot() -> None:
        sharing.split(data, n, k, backend=backend)  # type: ignore[arg-type]

    return {CHUNK_MODE: mbps(size, best_of(chunked)), ONESHOT: mbps(size, best_of(oneshot))}


def bench_combine(data: bytes, k: int, n: int, backend: str) -> dict[str, float]:
    size = len(data)
    xs = combine_xs(k, n)
    shares = [s for s in sharing.split(data, n, k, backend=backend) if s.x in xs]  # type: ignore[arg-type]
    # Byte p of a share belongs to byte p of the data: slices of whole shares are the chunks' shares.
    per_chunk = [
        [sharing.Share(x=s.x, data=s.data[lo:hi], k=k) for s in shares] for lo, hi in chunk_bounds(size)
    ]
    rebuilt = b"".join(
        sharing.interpolate(c, (0,), backend)[0].tobytes() for c in per_chunk  # type: ignore[arg-type]
    )
    if rebuilt != data or sharing.combine(shares, backend=backend) != data:  # type: ignore[arg-type]
        raise SystemExit(f"combine ({k},{n}) did not rebuild the data")
    del rebuilt

    rows = {hi - lo: linmap.empty_rows(1, hi - lo) for lo, hi in chunk_bounds(size)}  # reused, as in streams

    def chunked() -> None:
        for c in per_chunk:
            sharing.interpolate(c, (0,), backend, rows[len(c[0].data)])  # type: ignore[arg-type]

    def oneshot() -> None:
        sharing.combine(shares, backend=backend)  # type: ignore[arg-type]

    return {CHUNK_MODE: mbps(size, best_of(chunked)), ONESHOT: mbps(size, best_of(oneshot))}


# ----------------------------------------------------------------------------- zfec


def cut_blocks(buf: memoryview, k: int) -> tuple[bytes | memoryview, ...]:
    """k equal blocks of ``buf``; the last is zero-padded (a copy) when len % k != 0."""
    blen = -(-len(buf) // k)
    blocks: list[bytes | memoryview] = [buf[i * blen : (i + 1) * blen] for i in range(k - 1)]
    last = buf[(k - 1) * blen :]
    blocks.append(last if len(last) == blen else bytes(last) + bytes(blen - len(last)))
    return tuple(blocks)


def bench_zfec(data: bytes, k: int, n: int) -> dict[str, float]:
    import zfec

    size = len(data)
    view = memoryview(data)
    encoder = zfec.Encoder(k, n)
    chunk_blocks = [cut_blocks(view[lo:hi], k) for lo, hi in chunk_bounds(size)]
    whole_blocks = cut_blocks(view, k)

    def chunked() -> None:
        for blocks in chunk_blocks:
            encoder.encode(blocks)

    def oneshot() -> None:
        encoder.encode(whole_blocks)

    return {CHUNK_MODE: mbps(size, best_of(chunked)), ONESHOT: mbps(size, best_of(oneshot))}


# ----------------------------------------------------------------------------- pycryptodome


def bench_pycryptodome(quick: bool) -> dict[str, Any]:
    from Crypto.Protocol.SecretSharing import Shamir

    k, n = TARGET_KN
    want = 4096 if quick else SHAMIR_BASELINE_BLOCKS
    probe = [os.urandom(16) for _ in range(256)]
    for s in probe[:16]:  # warm-up
        Shamir.split(k, n, s)
    t0 = time.perf_counter()
    for s in probe:
        Shamir.split(k, n, s)
    per_block = (time.perf_counter() - t0) / len(probe)
    blocks = want
    if per_block * want > SHAMIR_BASELINE_BUDGET_S:
        blocks = max(256, int(SHAMIR_BASELINE_BUDGET_S / per_block))
    secrets = [os.urandom(16) for _ in range(blocks)]
    log(f"pycryptodome Shamir: {blocks} blocks (~{per_block * blocks:.1f} s)")

    def run() -> None:
        for s in secrets:
            Shamir.split(k, n, s)

    seconds = best_of(run, repeats=1 if per_block * blocks > 5 else REPEATS)
    return {
        "figure": "pycryptodome_shamir_split",
        "k": k,
        "n": n,
        "block_bytes": 16,
        "bytes_timed": 16 * blocks,
        "extrapolated": blocks < want,
        "MBps": round(16 * blocks / seconds / 1e6, 4),
        "seconds": round(seconds, 3),
    }


# ----------------------------------------------------------------------------- split_stream RSS

_RSS_CHILD = r"""
import json, os, resource, sys, tempfile, time
from qstore import sharing

file_bytes, piece, backend = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

def maxrss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

def hwm_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None

def stream(src_path, outs):
    t0 = time.perf_counter()
    with open(src_path, "rb") as src:
        total = sharing.split_stream(src, outs, 3, backend=backend)
    for o in outs:
        o.close()
    return total, time.perf_counter() - t0

with tempfile.TemporaryDirectory(prefix="qstore-bench-") as tmp:
    src_path = os.path.join(tmp, "data.bin")
    block = os.urandom(piece)
    with open(src_path, "wb") as f:
        for pos in range(0, file_bytes, piece):
            f.write(block[: min(piece, file_bytes - pos)])
    del block
    # Warm the kernel (JIT / on-disk cache) outside the measured streams.
    sharing.split(os.urandom(64 * 1024), 5, 3, backend=backend)
    before = maxrss_mib()
    null_total, null_s = stream(src_path, [open(os.devnull, "wb") for _ in range(5)])
    paths = [os.path.join(tmp, f"share.{x}") for x in range(1, 6)]
    total, seconds = stream(src_path, [open(p, "wb") for p in paths])
    sizes = [os.path.getsize(p) for p in paths]
    for p in paths:
        os.remove(p)
print(json.dumps({"total": total, "seconds": seconds, "null_total": null_total, "null_seconds": null_s,
                  "maxrss_before": before, "maxrss": maxrss_mib(), "hwm": hwm_mib(), "share_sizes": sizes}))
"""


def current_rss_mib() -> float | None:
    """This process's resident set now (VmRSS), in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def bench_rss(file_bytes: int, backend: str) -> dict[str, Any]:
    """Peak RSS and throughput of split_stream (3, 5) of a file, in a fresh child process.

    Linux carries the spawning process's RSS at fork time into the child's ru_maxrss across
    exec, so this runs while the parent is still small (before any data is allocated) and the
    child's own high-water mark (VmHWM) is reported alongside as a cross-check.
    """
    log(f"split_stream of a {file_bytes // MiB} MiB file in a child process")
    parent_rss = current_rss_mib()
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(file_bytes), str(CHUNK), backend],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"split_stream child failed:\n{proc.stderr}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    if r["total"] != file_bytes or r["null_total"] != file_bytes or r["share_sizes"] != [file_bytes] * 5:
        raise SystemExit(f"split_stream child wrote unexpected sizes: {r}")
    peak = round(r["maxrss"], 1)
    return {
        "figure": "split_stream_peak_rss",
        "k": 3,
        "n": 5,
        "file_MiB": file_bytes // MiB,
        "chunk_MiB": CHUNK // MiB,
        "peak_rss_MiB": peak,
        "target_MiB": RSS_TARGET_MIB,
        "met": peak <= RSS_TARGET_MIB,
        "rss_before_stream_MiB": round(r["maxrss_before"], 1),
        "child_vm_hwm_MiB": None if r["hwm"] is None else round(r["hwm"], 1),
        "parent_rss_at_spawn_MiB": parent_rss,
        "MBps": mbps(file_bytes, r["seconds"]),
        "io": "file -> 5 share files in a temp dir (page cache, no fsync), single run",
        "MBps_to_devnull": mbps(file_bytes, r["null_seconds"]),
    }


# ----------------------------------------------------------------------------- main


def ratio_record(what: str, k: int, n: int, mode: str, value: float, target: float | None) -> dict[str, Any]:
    return {
        "figure": "ratio",
        "what": what,
        "k": k,
        "n": n,
        "mode": mode,
        "value": round(value, 2),
        "target": target,
        "met": None if target is None else value >= target,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", type=parse_size, default=None, help="data size (default 64MiB; 8MiB quick)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--backend", choices=linmap.BACKENDS, default=None)
    parser.add_argument("--skip-rss", action="store_true", help="skip the split_stream peak-RSS figure")
    args = parser.parse_args(argv)

    size: int = args.size or (8 * MiB if args.quick else 64 * MiB)
    backend: str = args.backend or linmap.default_backend()
    rss_file = 64 * MiB if args.quick else 1024 * MiB

    emit(environment(backend, size))
    # The RSS child runs first, while this process is small (see bench_rss); printed last.
    rss_record = None if args.skip_rss else bench_rss(rss_file, backend)
    data = os.urandom(size)

    split_fig: dict[tuple[int, int], dict[str, float]] = {}
    combine_fig: dict[tuple[int, int], dict[str, float]] = {}
    zfec_fig: dict[tuple[int, int], dict[str, float]] = {}
    for k, n in KN:
        log(f"({k},{n}) split")
        split_fig[k, n] = bench_split(data, k, n, backend)
        log(f"({k},{n}) combine")
        combine_fig[k, n] = bench_combine(data, k, n, backend)
        log(f"({k},{n}) zfec encode")
        zfec_fig[k, n] = bench_zfec(data, k, n)
        for mode in (CHUNK_MODE, ONESHOT):
            emit({"figure": "split", "k": k, "n": n, "mode": mode, "MBps": split_fig[k, n][mode],
                  "backend": backend, "rng": "AesCtrRandom"})
        for mode in (CHUNK_MODE, ONESHOT):
            emit({"figure": "combine", "k": k, "n": n, "mode": mode, "MBps": combine_fig[k, n][mode],
                  "backend": backend, "xs": list(combine_xs(k, n))})
        for mode in (CHUNK_MODE, ONESHOT):
            emit({"figure": "zfec_encode", "k": k, "n": n, "mode": mode, "MBps": zfec_fig[k, n][mode]})

    for k, n in KN:
        target = (k, n) == TARGET_KN
        for mode in (CHUNK_MODE, ONESHOT):
            z = zfec_fig[k, n][mode]
            emit(ratio_record("split/zfec_encode", k, n, mode, split_fig[k, n][mode] / z,
                              SPLIT_TARGET if target else None))
            emit(ratio_record("combine/zfec_encode", k, n, mode, combine_fig[k, n][mode] / z,
                              COMBINE_TARGET if target else None))

    log("pycryptodome Shamir")
    pyc = bench_pycryptodome(args.quick)
    emit(pyc)
    emit(ratio_record("split/pycryptodome_shamir", *TARGET_KN, CHUNK_MODE,
                      split_fig[TARGET_KN][CHUNK_MODE] / pyc["MBps"], None))

    if rss_record is not None:
        emit(rss_record)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
