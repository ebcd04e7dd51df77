"""`qstore console`: serve the web console (network map, nodes, objects, statistics, key-rate planner)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from client.storage_cli import _state_arg


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("console", help="serve the web console (log in with an S3 gateway user's keys)")
    _state_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    p.add_argument("--as", dest="sae", metavar="SAE",
                   help="the SAE statistics run as (default: $QSTORE_SAE or 'client')")
    p.add_argument("--users", type=Path, metavar="FILE",
                   help="a credentials file of users who may log in (besides the gateway's)")
    p.add_argument("--session-ttl", type=float, default=8 * 3600.0, metavar="SECONDS",
                   help="a session's longest life (default: 8 h; 1 h idle ends it sooner)")
    p.set_defaults(handler=run_console)


def run_console(args: argparse.Namespace) -> int:
    from aiohttp import web

    from client.console.app import ConsoleConfig, create_app
    from qstore.cluster import state_dir
    from qstore.errors import LocalError

    if not 0 < args.port <= 65535:
        raise LocalError("the port must be 1 to 65535")
    sae = args.sae or os.environ.get("QSTORE_SAE") or "client"
    config = ConsoleConfig(state=state_dir(args.state), sae=sae,
                           users_file=args.users, session_ttl_s=args.session_ttl,
                           idle_ttl_s=min(3600.0, args.session_ttl))
    app = create_app(config)
    if not config.users():
        raise LocalError(f"no users may log in: no gateway credentials in {config.state} "
                         "(`qstore cluster up` starts a gateway) and no --users file")
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"qstore console on http://{host}:{args.port}/ (state {config.state})", flush=True)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)
    return 0
