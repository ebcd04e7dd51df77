"""`qstore put|get|ls|rm|stat|repair` and `qstore node serve`: the storage commands.

Every command finds the cluster through its state directory (``--state``,
``$QSTORE_HOME`` or ``./.qstore``). Output is a short human summary, or one
JSON document with ``--json``; long transfers show a progress bar with
throughput on stderr when it is a terminal. ``get`` writes to a temporary file
beside the target and renames it only when the whole object checked out, so a
failed read never leaves a half-written file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from qstore.errors import LocalError

T = TypeVar("T")
DEFAULT_BUCKET = "default"


def _state_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", metavar="DIR",
                   help="cluster state directory (default: $QSTORE_HOME or ./.qstore)")


def _common(p: argparse.ArgumentParser, *, bucket: bool = True) -> None:
    _state_arg(p)
    if bucket:
        p.add_argument("--bucket", "-b", default=DEFAULT_BUCKET, help=f"bucket (default: {DEFAULT_BUCKET})")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def add_parsers(sub: Any, parse_size: Callable[[str], int]) -> None:
    p = sub.add_parser("put", help="store a file, Shamir-split across the nodes over QKD-keyed links")
    p.add_argument("file", help="file to store ('-': standard input)")
    p.add_argument("name", nargs="?", help="object name (default: the file's name)")
    _common(p)
    p.add_argument("--write-quorum", "-W", type=int, help="nodes that must hold it to commit (default: all)")
    p.add_argument("--link-cipher", choices=("otp", "aes-256-gcm"), default="otp",
                   help="link protection: otp (default, information-theoretic) or aes-256-gcm (weaker)")
    p.add_argument("--chunk-size", type=parse_size, default=4 << 20, help="chunk size (default 4M)")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                   help="user metadata (secret-shared like the data)")
    p.set_defaults(handler=run_put)

    g = sub.add_parser("get", help="fetch an object, checking and correcting shares")
    g.add_argument("name", help="object name")
    g.add_argument("-o", "--output", help="where to write it (default: its name's last part; '-': stdout)")
    _common(g)
    g.set_defaults(handler=run_get)

    ls = sub.add_parser("ls", help="list objects")
    ls.add_argument("prefix", nargs="?", default="", help="only names starting with this")
    _common(ls)
    ls.set_defaults(handler=run_ls)

    rm = sub.add_parser("rm", help="delete an object (a tombstone on every node)")
    rm.add_argument("name")
    _common(rm)
    rm.set_defaults(handler=run_rm)

    st = sub.add_parser("stat", help="an object's version, size, holders and metadata")
    st.add_argument("name")
    _common(st)
    st.set_defaults(handler=run_stat)

    rp = sub.add_parser("repair", help="rebuild a wiped or replaced node's shares from k others")
    rp.add_argument("node", nargs="?", help="site, node ID or x (default: every node)")
    _common(rp, bucket=False)
    rp.add_argument("--bucket", "-b", help="only this bucket (default: all)")
    rp.set_defaults(handler=run_repair)

    node = sub.add_parser("node", help="storage node process")
    node_sub = node.add_subparsers(dest="node_command", metavar="COMMAND")
    node_sub.required = True
    ns = node_sub.add_parser("serve", help="run one site's storage node (as `qstore cluster up` does)")
    ns.add_argument("--site", required=True)
    _state_arg(ns)
    ns.set_defaults(handler=run_node_serve)


# -- plumbing ------------------------------------------------------------------------------


def _client(args: argparse.Namespace, **kw: Any) -> Any:
    from client.storage import QStore

    return QStore.open(args.state, **kw)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@contextlib.contextmanager
def _progress(args: argparse.Namespace, total: int | None,
              label: str) -> Iterator[Callable[[int], None] | None]:
    """A rich progress bar on stderr (only on a terminal, and not with --json/--quiet)."""
    if args.json or args.quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
               TransferSpeedColumn(), TimeRemainingColumn()]
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _emit(args: argparse.Namespace, doc: Any, text: str) -> None:
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(text)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _links_text(report: Any) -> str:
    rows = [f"  {site:<12} sent {_human(u.bytes_sent):>10}  received {_human(u.bytes_received):>10}  "
            f"key spent {_human(u.key_bytes):>10}" for site, u in sorted(report.links.items())]
    return "\n".join(rows)


def _problems(report: Any) -> str:
    lines = [f"  node {site} left out: {why}" for site, why in sorted(report.failed.items())]
    lines += [f"  node {site} sent a bad share (corrected): {why}"
              for site, why in sorted(report.bad.items())]
    return ("\n" + "\n".join(lines)) if lines else ""


def _meta(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LocalError(f"--meta takes KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


# -- commands -------------------------------------------------------------------------------


def run_put(args: argparse.Namespace) -> int:
    meta = _meta(args.meta)
    name = args.name or (None if args.file == "-" else Path(args.file).name)
    if not name:
        raise LocalError("give an object name when storing standard input")
    stdin = args.file == "-"
    source_ctx = contextlib.nullcontext(sys.stdin.buffer) if stdin else open(args.file, "rb")  # noqa: SIM115
    with source_ctx as source:
        size = None if stdin else os.fstat(source.fileno()).st_size

        async def go() -> Any:
            async with _client(args, write_quorum=args.write_quorum, link_cipher=args.link_cipher,
                               chunk_size=args.chunk_size) as qs:
                if args.bucket not in await qs.list_buckets():  # created on first use, before any read
                    await qs.create_bucket(args.bucket)
                with _progress(args, size, f"put {name}") as progress:
                    return await qs.put(args.bucket, name, source, meta=meta, progress=progress)

        report = _run(go())
    rate = report.size / report.seconds / 1e6 if report.seconds else 0.0
    _emit(args, report.to_json(),
          f"stored {args.bucket}/{name}: {_human(report.size)} in {report.seconds:.2f} s ({rate:.1f} MB/s), "
          f"version {report.version}, on {len(report.nodes)} nodes ({', '.join(report.nodes)}), "
          f"link cipher {report.link_cipher}\n" + _links_text(report) + _problems(report))
    return 0


def run_get(args: argparse.Namespace) -> int:
    async def head_and_get(sink: Any) -> Any:
        async with _client(args) as qs:
            info = await qs.head(args.bucket, args.name)
            with _progress(args, info.size, f"get {args.name}") as progress:
                return await qs.get(args.bucket, args.name, sink, progress=progress)

    if args.output == "-":
        report = _run(head_and_get(sys.stdout.buffer))
        sys.stdout.buffer.flush()
    else:
        target = Path(args.output or args.name.rsplit("/", 1)[-1] or "object")
        if target.is_dir():
            target = target / (args.name.rsplit("/", 1)[-1] or "object")
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent or ".")
        try:
            with os.fdopen(fd, "wb") as sink:
                report = _run(head_and_get(sink))
                sink.flush()
                os.fsync(sink.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    rate = report.size / report.seconds / 1e6 if report.seconds else 0.0
    where = "stdout" if args.output == "-" else str(target)
    text = (f"fetched {args.bucket}/{args.name} → {where}: {_human(report.size)} in {report.seconds:.2f} s "
            f"({rate:.1f} MB/s), from {', '.join(report.nodes)}"
            + ("" if report.verified else " (unverified: only k nodes could serve it)") + "\n"
            + _links_text(report) + _problems(report))
    if args.output == "-":
        if args.json:
            print(json.dumps(report.to_json()), file=sys.stderr)
        elif report.bad or report.failed:
            print(text, file=sys.stderr)
    else:
        _emit(args, report.to_json(), text)
    return 0


def run_ls(args: argparse.Namespace) -> int:
    async def go() -> Any:
        async with _client(args) as qs:
            out, after = [], ""
            while True:
                batch = await qs.list(args.bucket, args.prefix, start_after=after)
                out += batch
                if len(batch) < 1000:
                    return out
                after = batch[-1].key

    found = _run(go())
    import datetime

    rows = [f"{_human(i.size):>10}  {datetime.datetime.fromtimestamp(i.version / 1e9):%Y-%m-%d %H:%M:%S}"
            f"  {i.key}" for i in found]
    _emit(args, [i.to_json() for i in found], "\n".join(rows) if rows else f"(bucket {args.bucket} is empty)")
    return 0


def run_rm(args: argparse.Namespace) -> int:
    async def go() -> Any:
        async with _client(args) as qs:
            return await qs.delete(args.bucket, args.name)

    report = _run(go())
    _emit(args, report.to_json(), f"deleted {args.bucket}/{args.name} (on {len(report.nodes)} nodes)"
          + _problems(report))
    return 0


def run_stat(args: argparse.Namespace) -> int:
    async def go() -> Any:
        async with _client(args) as qs:
            return await qs.head(args.bucket, args.name)

    info = _run(go())
    meta = "".join(f"\n  meta {k} = {v}" for k, v in sorted(info.user_meta.items()))
    _emit(args, info.to_json(),
          f"{args.bucket}/{info.key}\n  size {info.size} bytes ({_human(info.size)})"
          f" in {info.chunks} chunk(s)"
          f" of {_human(info.chunk_size)}\n  version {info.version} (object {info.object_id})\n"
          f"  link cipher {info.link_cipher}\n  held by {', '.join(info.holders)}" + meta)
    return 0


def run_repair(args: argparse.Namespace) -> int:
    async def go() -> list[dict[str, Any]]:
        async with _client(args) as qs:
            targets = [args.node] if args.node else [nd.site for nd in qs.state.nodes]
            out = []
            for target in targets:
                with _progress(args, None, f"repair {target}") as progress:
                    out.append(await qs.repair(target, bucket=args.bucket, progress=progress))
            return out

    results = _run(go())
    lines = []
    for r in results:
        lines.append(f"node {r['node']}: {r['objects']} object(s) checked, {len(r['repaired'])} repaired"
                     + "".join(f"\n  repaired {name}" for name in r["repaired"])
                     + "".join(f"\n  FAILED {name}: {why}" for name, why in r["failed"].items()))
    _emit(args, results, "\n".join(lines))
    return 1 if any(r["failed"] for r in results) else 0


def run_node_serve(args: argparse.Namespace) -> int:
    from nodes.service import NodeConfig, serve
    from qstore.cluster import ClusterState, state_dir

    state = ClusterState.load(state_dir(args.state))
    serve(NodeConfig.from_state(state, args.site))
    return 0
