"""`qstore ca init|issue|list`: the cluster CA, offline, for certificates copied to the sites.

Parsers only; the work is in :mod:`client.cluster` (over :mod:`qkd_sim.pki`),
imported when a command runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from client.cluster_cli import _state_arg


def add_parsers(sub: Any) -> None:
    c = sub.add_parser("ca", help="the cluster's certificate authority: init, issue, list")
    cs = c.add_subparsers(dest="ca_command", metavar="CA_COMMAND")
    cs.required = True

    i = cs.add_parser("init", help="create the cluster CA in STATE/ca (ca.pem, ca.key mode 0600)")
    _state_arg(i)
    i.add_argument("--force", action="store_true",
                   help="replace an existing CA (every certificate it issued stops working)")
    i.add_argument("--name", default="qstore-dev-ca", help="the CA's common name (default qstore-dev-ca)")
    i.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    i.add_argument("--json", action="store_true")
    i.set_defaults(handler=run_init)

    s = cs.add_parser("issue", help="issue a certificate and key (0600) signed by the CA, to copy to a site")
    s.add_argument("sae_id", metavar="SAE_ID", help="kme.SITE, node.SITE, or an SAE (client, gateway, ...)")
    s.add_argument("--kind", choices=("sae", "node", "kme"),
                   help="default from the ID: kme.* kme, node.* node, else sae")
    s.add_argument("--host", dest="hosts", metavar="H", action="extend", nargs="+", default=[],
                   help="names or addresses it serves on (kme and node certificates; the site's host)")
    _state_arg(s)
    s.add_argument("--out", type=Path, metavar="DIR", help="write SAE_ID.pem and SAE_ID.key here "
                   "(default STATE/certs)")
    s.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    s.add_argument("--force", action="store_true", help="replace existing files")
    s.add_argument("--json", action="store_true")
    s.set_defaults(handler=run_issue)

    ls = cs.add_parser("list", help="the certificates the CA issued: subject, kind, hosts, expiry")
    _state_arg(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(handler=run_list)


def run_init(args: argparse.Namespace) -> int:
    from client import cluster
    from qstore.cluster import state_dir

    made = cluster.ca_init(state_dir(args.state), force=args.force, name=args.name, days=args.days)
    if args.json:
        print(json.dumps(made))
    else:
        print(f"CA {made['subject']} until {made['not_after']}: {made['cert']} (copy to every host), "
              f"{made['key']} (stays here)")
    return 0


def run_issue(args: argparse.Namespace) -> int:
    from client import cluster
    from qstore.cluster import state_dir

    made = cluster.ca_issue(state_dir(args.state), args.sae_id, kind=args.kind, hosts=args.hosts,
                            out=args.out, force=args.force, days=args.days)
    if args.json:
        print(json.dumps(made))
    else:
        hosts = f" for {', '.join(made['hosts'])}" if made["hosts"] else ""
        print(f"{made['kind']} {made['subject']}{hosts} until {made['not_after']}: {made['cert']}, "
              f"{made['key']}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from client import cluster
    from qstore.cluster import state_dir

    listed = cluster.ca_list(state_dir(args.state))
    if args.json:
        print(json.dumps(listed))
        return 0
    from rich.console import Console
    from rich.table import Table

    ca = listed["ca"]
    key = "with its key" if ca["has_key"] else "certificate only"
    table = Table(title=f"CA {ca['subject']} ({key}), until {ca['not_after']}")
    for col in ("subject", "kind", "hosts", "expires", "file"):
        table.add_column(col, no_wrap=col != "file")
    for e in listed["issued"]:
        expires = e["not_after"] + (" EXPIRED" if e["expired"] else "")
        table.add_row(e["subject"], e["kind"], ", ".join(e["hosts"]) or "-", expires, e.get("file", "-"))
    Console().print(table)
    return 0
