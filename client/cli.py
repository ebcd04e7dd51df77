"""The `qstore` command line.

Every failure ends as one line on stderr and a non-zero exit code, never a
traceback: qstore's own errors carry their message, anything else is
reported by type.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

# Before numpy loads: qstore does no linear algebra in BLAS, and OpenBLAS's
# idle worker threads spin on the two cores the data path needs.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from qstore.errors import QStoreError

Handler = Callable[[argparse.Namespace], int]


def parse_size(text: str) -> int:
    """'64M', '1G', '4096', '512k' -> bytes (binary units)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = int(float(num) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("size must not be negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    from client import demo

    parser = argparse.ArgumentParser(
        prog="qstore", description="Quantum-safe distributed storage (Shamir sharing over QKD links)."
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    d = sub.add_parser("demo", help="split a sample file k-of-n, drop shares, rebuild, verify")
    demo.add_arguments(d, parse_size)
    d.set_defaults(handler=demo.run)
    from client import qkd_cli

    qkd_cli.add_parsers(sub)
    from client import cluster_cli

    cluster_cli.add_parsers(sub)
    from client import ca_cli

    ca_cli.add_parsers(sub)
    from client import storage_cli

    storage_cli.add_parsers(sub, parse_size)
    from client import s3_cli

    s3_cli.add_parsers(sub)
    from client import stats_cli

    stats_cli.add_parsers(sub)
    from client import console_cli

    console_cli.add_parsers(sub)
    return parser


def _version() -> str:
    from qstore import __version__

    return f"qstore {__version__}"


FAST_LOOP_COMMANDS = frozenset({"put", "get", "repair", "node", "kme", "demo", "s3"})
"""Commands that move bulk data (or serve it) and own their process: they run on uvloop when installed."""


def _fast_event_loop() -> None:
    """uvloop when installed: its TLS and socket paths copy less than asyncio's (env QSTORE_UVLOOP=0: off)."""
    if os.environ.get("QSTORE_UVLOOP", "1") == "0":
        return
    try:
        import uvloop
    except ImportError:
        return
    import asyncio

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: Sequence[str] | None = None) -> int:
    from qstore._memory import tune_allocator

    tune_allocator()  # every qstore process (client, node, KME) moves 4 MiB buffers
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in FAST_LOOP_COMMANDS:
        _fast_event_loop()
    handler: Handler = args.handler
    try:
        return handler(args)
    except BrokenPipeError:  # e.g. `qstore ... | head`: the reader has what it wanted
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("qstore: interrupted", file=sys.stderr)
        return 130
    except QStoreError as exc:
        print(f"qstore: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"qstore: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except Exception as exc:  # the CLI promises no tracebacks
        print(f"qstore: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
