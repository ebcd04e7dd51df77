"""`qstore s3 serve` and `qstore s3 credentials`: the S3 gateway from the command line.

Parsers only; the gateway is :mod:`client.s3.gateway`, imported when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from client.cluster_cli import _state_arg

CREDENTIALS_FILE = "gateway/credentials.json"


def add_parsers(sub: Any) -> None:
    s = sub.add_parser("s3", help="the S3-compatible gateway: serve, credentials")
    ss = s.add_subparsers(dest="s3_command", metavar="S3_COMMAND")
    ss.required = True

    v = ss.add_parser("serve", help="run the S3 gateway for the cluster of the state directory")
    _state_arg(v)
    v.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    v.add_argument("--port", type=int, default=9000, help="listen port (default 9000)")
    v.add_argument("--credentials", type=Path, metavar="FILE",
                   help=f"users and their keys, JSON, mode 0600 (default: STATE/{CREDENTIALS_FILE})")
    v.set_defaults(handler=run_serve)

    c = ss.add_parser("credentials", help="the local gateway's endpoint and keys, in the AWS CLI's format")
    _state_arg(c)
    c.add_argument("--profile", default="default", help="profile name of the block (default: default)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(handler=run_credentials)


def run_serve(args: argparse.Namespace) -> int:
    import logging

    from client.s3.gateway import GatewayConfig, serve
    from client.s3.users import Users
    from qstore.cluster import state_dir
    from qstore.errors import LocalError

    root = state_dir(args.state)
    if not 0 <= args.port <= 65535:
        raise LocalError("port must be 0 to 65535")
    creds = args.credentials or root / CREDENTIALS_FILE
    users = Users.load(creds)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"qstore s3: serving http://{args.host}:{args.port} for {len(users)} user(s)", file=sys.stderr)
    serve(GatewayConfig(state_dir=root, users=users, host=args.host, port=args.port))
    return 0


def run_credentials(args: argparse.Namespace) -> int:
    from qstore.cluster import ClusterState, ClusterStateError, state_dir

    state = ClusterState.load(state_dir(args.state))
    gw = state.extra.get("gateway")
    if not isinstance(gw, dict) or not all(k in gw for k in ("url", "access_key", "secret_key")):
        raise ClusterStateError(f"{state.path}: the cluster runs no S3 gateway")
    if args.json:
        print(json.dumps({k: gw[k] for k in ("url", "access_key", "secret_key")}))
        return 0
    print(f"[{args.profile}]")
    print(f"aws_access_key_id = {gw['access_key']}")
    print(f"aws_secret_access_key = {gw['secret_key']}")
    print(f"endpoint_url = {gw['url']}")
    print(f"# e.g. aws --endpoint-url {gw['url']} s3 ls", file=sys.stderr)
    return 0
