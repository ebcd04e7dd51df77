"""`qstore demo`: the system at work on one machine.

By default it uses the local cluster (starting ``deploy/local.toml`` when no
cluster runs in the state directory, and leaving it running): it stores a
sample file (synthetic patient records) through the client library, shows
that a node's stored share looks like noise, reads the file back, verifies
it and prints the key spent on every QKD link.

``--offline`` shows the information-theoretic core alone, without any
process: it splits the file k-of-n into share files, drops n-k shares,
rebuilds from the rest, verifies the digest and prints timings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qstore import linmap, sharing
from qstore.errors import LocalError
from qstore.rng import AesCtrRandom, OsRandom

PREVIEW = 32


def add_arguments(p: argparse.ArgumentParser, size_type: Callable[[str], int]) -> None:
    p.add_argument("--size", type=size_type, default="32M", help="sample file size (default 32M)")
    p.add_argument("-k", type=int, default=3, help="threshold (default 3)")
    p.add_argument("-n", type=int, default=5, help="number of shares (default 5)")
    p.add_argument("--file", type=Path, help="split this file instead of a generated sample")
    p.add_argument("--strict-random", action="store_true", help="coefficients from os.urandom only")
    p.add_argument("--workdir", type=Path, help="keep the files here (default: a temporary directory)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--offline", action="store_true",
                   help="no cluster: split into share files and rebuild, in this process")
    p.add_argument("--state", metavar="DIR",
                   help="cluster state directory (default: $QSTORE_HOME or ./.qstore)")


def sample_records(size: int) -> bytes:
    """Readable, repetitive CSV: the kind of file that must not leak."""
    rng = np.random.default_rng(2026)
    header = b"patient_id,age,sex,height_cm,weight_kg,diagnosis\n"
    diagnoses = ["J45.0 asthma", "E11.9 diabetes", "I10 hypertension", "C50.9 breast cancer", "G35 MS"]
    rows = [header]
    total = len(header)
    i = 0
    while total < size:
        age, sex = int(rng.integers(0, 100)), "MF"[int(rng.integers(0, 2))]
        line = (
            f"P{i:08d},{age},{sex},{rng.normal(170, 10):.1f},{rng.normal(75, 12):.1f},"
            f"{diagnoses[int(rng.integers(0, len(diagnoses)))]}\n"
        ).encode()
        rows.append(line)
        total += len(line)
        i += 1
    block = b"".join(rows)
    return block[:size]


def entropy_bits_per_byte(data: bytes) -> float:
    """Shannon entropy of the byte histogram: 8.0 for uniform noise."""
    if not data:
        return 0.0
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    p = counts[counts > 0] / len(data)
    return float(-(p * np.log2(p)).sum())


def _progress(enabled: bool):  # -> rich Progress or a no-op
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    return Progress(
        TextColumn("{task.description:<10}"), BarColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
        disable=not enabled, transient=True,
    )


def run(args: argparse.Namespace) -> int:
    if not args.offline:
        if args.workdir or args.strict_random or (args.k, args.n) != (3, 5):
            raise LocalError("-k, -n, --workdir and --strict-random belong to --offline "
                             "(the cluster's k and n come from its config)")
        return run_cluster(args)
    from rich.console import Console

    sharing.check_parameters(args.n, args.k)
    console = Console(highlight=False)
    with tempfile.TemporaryDirectory(prefix="qstore-demo-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.file:
            src = args.file
        else:
            src = work / "patients.csv"
            src.write_bytes(sample_records(args.size))
        size = src.stat().st_size
        report = _demo(src, work, args, console)
        report["size"] = size
    if args.json:
        print(json.dumps(report))
    return 0 if report["verified"] else 1


def _demo(src: Path, work: Path, args: argparse.Namespace, console) -> dict:
    n, k = args.n, args.k
    size = src.stat().st_size
    factory = OsRandom if args.strict_random else AesCtrRandom
    paths = [work / f"share-{x}.bin" for x in range(1, n + 1)]
    say = (lambda *a: None) if args.json else console.print
    say(f"[bold]qstore demo[/]: {src.name}, {size:,} bytes, split {k}-of-{n} "
        f"({'os.urandom' if args.strict_random else 'AES-256-CTR re-keyed per chunk'}, "
        f"kernel {linmap.default_backend()})")
    sharing.split(b"warm-up" * 1000, n, k)  # compile the kernel outside the timing

    show = not args.json and size >= 8 << 20
    with _progress(show) as bar, src.open("rb") as fin:
        task = bar.add_task("split", total=size)
        files = [p.open("wb") for p in paths]
        try:
            t0 = time.perf_counter()
            sharing.split_stream(fin, files, k, rng_factory=factory, progress=lambda b: bar.advance(task, b))
            t_split = time.perf_counter() - t0
        finally:
            for f in files:
                f.close()

    original = _head(src)
    say(f"\n  original  {original[:24]!r:<32}  entropy {entropy_bits_per_byte(original):.2f} bits/byte")
    for x, p in enumerate(paths, 1):
        head = _head(p)
        hexed = head[: PREVIEW // 3].hex(" ")
        say(f"  share {x:<3} {hexed:<32}  entropy {entropy_bits_per_byte(head):.2f} bits/byte")

    # Drop odd x first: 3-of-5 rebuilds from {2, 4, 5}, as the benchmark does.
    order = [x for x in range(1, n + 1) if x % 2] + [x for x in range(1, n + 1) if not x % 2]
    dropped = sorted(order[: n - k])
    for x in dropped:
        paths[x - 1].unlink()
    kept = [x for x in range(1, n + 1) if x not in dropped]
    say(f"\n  dropped shares {dropped}; rebuilding from {kept}")

    out_path = work / "rebuilt.bin"
    with _progress(show) as bar, out_path.open("wb") as fout:
        task = bar.add_task("combine", total=size)
        files = [paths[x - 1].open("rb") for x in kept]
        try:
            t0 = time.perf_counter()
            sharing.combine_stream(list(zip(kept, files, strict=True)), fout, k,
                                   progress=lambda b: bar.advance(task, b))
            t_combine = time.perf_counter() - t0
        finally:
            for f in files:
                f.close()

    d_src, d_out = _sha256(src), _sha256(out_path)
    verified = d_src == d_out
    mb = size / 1e6
    say(f"  sha256 original {d_src[:16]}…  rebuilt {d_out[:16]}…  "
        f"{'[green]identical[/]' if verified else '[red]DIFFERENT[/]'}")
    kernel = _in_memory_rate(src, n, k, factory)
    say(f"\n  split into {n} share files      {t_split * 1000:8.1f} ms  {_rate(mb, t_split)}")
    say(f"  rebuild from {k} share files    {t_combine * 1000:8.1f} ms  {_rate(mb, t_combine)}")
    say(f"  split in memory (4 MiB chunks, no disk)       {kernel:8.1f} MB/s")
    return {
        "k": k, "n": n, "dropped": dropped, "kept": kept, "verified": verified,
        "split_seconds": t_split, "combine_seconds": t_combine, "split_in_memory_MBps": kernel,
        "share_entropy_bits_per_byte": [entropy_bits_per_byte(_head(p)) for p in paths if p.exists()],
        "original_entropy_bits_per_byte": entropy_bits_per_byte(_head(src)),
    }


def _in_memory_rate(src: Path, n: int, k: int, factory) -> float:
    """MB/s of splitting (up to) the first 64 MiB of the file again, without disk I/O."""
    data = _head(src, 64 << 20)
    if not data:
        return 0.0
    chunk = min(len(data), sharing.DEFAULT_CHUNK)
    out = linmap.empty_rows(n, chunk)
    view = memoryview(data)
    sharing.split_into(view[:chunk], n, k, out, rng=factory())  # warm-up
    t0 = time.perf_counter()
    for lo in range(0, len(data) - chunk + 1, chunk):
        sharing.split_into(view[lo : lo + chunk], n, k, out, rng=factory())
    seconds = time.perf_counter() - t0
    return (len(data) // chunk * chunk) / 1e6 / seconds if seconds > 0 else 0.0


def _head(path: Path, limit: int = 1 << 20) -> bytes:
    with path.open("rb") as f:
        return f.read(limit)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _rate(mb: float, seconds: float) -> str:
    return f"{mb / seconds:8.1f} MB/s" if seconds > 0 and not math.isclose(seconds, 0) else ""


# -- the cluster demo ------------------------------------------------------------------------


def run_cluster(args: argparse.Namespace) -> int:
    """Store a sample file on the local cluster and read it back, with key spent per link."""
    import asyncio

    from rich.console import Console

    from client import cluster
    from client.storage import QStore
    from qstore.cluster import ClusterState, state_dir

    console = Console(highlight=False, stderr=args.json)
    root = state_dir(args.state)
    started = False
    try:
        state = ClusterState.load(root)
        if not cluster.healthy(cluster.status(root)):
            raise LocalError("not healthy")
    except LocalError:
        console.print(f"[bold]Starting the local cluster[/] (deploy/local.toml) in {root} ...")
        state = cluster.up(None, root)
        started = True
    with tempfile.TemporaryDirectory(prefix="qstore-demo-") as tmp:
        if args.file:
            src = args.file
        else:
            src = Path(tmp) / "patients.csv"
            src.write_bytes(sample_records(args.size))
        size = src.stat().st_size
        name = src.name
        back = Path(tmp) / "back.bin"

        async def go() -> tuple:
            async with QStore(state) as qs:
                await qs.create_bucket("demo")
                with src.open("rb") as f, _progress(not args.json) as bar:
                    task = bar.add_task("put", total=size)
                    put = await qs.put("demo", name, f, meta={"source": "qstore demo"},
                                       progress=lambda n: bar.advance(task, n))
                with back.open("wb") as f, _progress(not args.json) as bar:
                    task = bar.add_task("get", total=size)
                    got = await qs.get("demo", name, f, progress=lambda n: bar.advance(task, n))
                return put, got

        put, got = asyncio.run(go())
        verified = _sha256(back) == _sha256(src)
        share_entropy = _stored_share_entropy(state, put.object_id)
        file_entropy = entropy_bits_per_byte(_head(src))
    report = {
        "cluster": str(root), "started_cluster": started, "k": state.k, "n": len(state.nodes),
        "file": name, "size": size, "verified": verified,
        "put": put.to_json(), "get": got.to_json(),
        "entropy_bits_per_byte": {"file": round(file_entropy, 3), "stored_share": share_entropy},
    }
    if args.json:
        print(json.dumps(report))
        return 0 if verified else 1
    mb = size / 1e6
    console.print(f"[bold]{name}[/]: {size:,} bytes, {file_entropy:.2f} bits of entropy per byte")
    console.print(f"stored 3-of-5 → bucket demo in {put.seconds:.2f} s ({_rate(mb, put.seconds)}), "
                  f"version {put.version}, on {', '.join(put.nodes)}, link cipher {put.link_cipher}")
    if share_entropy is not None:
        console.print(f"what node {state.nodes[0].site} holds: {share_entropy:.2f} bits per byte (noise; "
                      f"any {state.k - 1} nodes together learn nothing)")
    console.print(f"read back in {got.seconds:.2f} s ({_rate(mb, got.seconds)}) from {', '.join(got.nodes)}; "
                  + ("[green]SHA-256 verified[/]" if verified else "[red]MISMATCH[/]"))
    console.print("QKD key spent per link (one-time pad + one-time MAC):")
    for site in sorted(put.links):
        p, g = put.links[site], got.links.get(site)
        console.print(f"  client ↔ {site:<8} put {p.key_bytes / 1e6:8.2f} MB"
                      f"   get {(g.key_bytes if g else 0) / 1e6:8.2f} MB")
    if started:
        console.print(f"The cluster keeps running: `qstore cluster status`, `qstore ls --bucket demo`, "
                      f"`qstore cluster down` (state: {root}).")
    return 0 if verified else 1


def _stored_share_entropy(state, object_id: str | None) -> float | None:
    """Entropy of the first node's stored share data of the object (local clusters: its data is on disk)."""
    node = state.nodes[0]
    if node.data is None or object_id is None:
        return None
    files = [p for p in Path(node.data, "objects").rglob(f"*{object_id}*") if p.is_file()]
    if not files:
        files = sorted((p for p in Path(node.data, "objects").rglob("*") if p.is_file()),
                       key=lambda p: p.stat().st_mtime)[-1:]
    return round(entropy_bits_per_byte(_head(files[0])), 3) if files else None
