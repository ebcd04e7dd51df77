"""`qstore cluster up|status|down|secrets` and `qstore kme serve`: a cluster from the command line.

Parsers only; the work is in :mod:`client.cluster`, imported when a command
runs so that building the parser stays cheap for every other command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _state_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", metavar="DIR",
                   help="cluster state directory (default: $QSTORE_HOME or ./.qstore)")


def add_parsers(sub: Any) -> None:
    c = sub.add_parser("cluster", help="a cluster, or one site of it: up, status, down, secrets")
    cs = c.add_subparsers(dest="cluster_command", metavar="CLUSTER_COMMAND")
    cs.required = True

    u = cs.add_parser("up", help="start every KME and node of a cluster file, wait until all are healthy")
    u.add_argument("config", type=Path, nargs="?", help="cluster file (default: deploy/local.toml)")
    _state_arg(u)
    u.add_argument("--only", metavar="SITE",
                   help="start only this site's processes (KME, node, the S3 gateway at its site), on the "
                        "fixed ports of the cluster file, with the CA, certificates and secrets.json in the "
                        "state directory: one host of a cluster across hosts")
    u.add_argument("--no-nodes", action="store_true", help="start the KMEs only")
    u.add_argument("--no-gateway", action="store_true", help="do not start the S3 gateway")
    u.add_argument("--gateway-port", type=int, metavar="PORT",
                   help="S3 gateway port (default: the cluster file's [cluster] gateway_port, else a free "
                        "one; with --only 9000: the same on every host)")
    u.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for health (default 30)")
    u.add_argument("--json", action="store_true", help="print cluster.json instead of a table")
    u.set_defaults(handler=run_up)

    s = cs.add_parser("status", help="each process and each link's key pools (exit 1 if any is down)")
    _state_arg(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(handler=run_status)

    d = cs.add_parser("down", help="stop the processes started from the state directory (keeps certificates "
                                   "and node data; other hosts' processes are not touched)")
    _state_arg(d)
    d.add_argument("--only", metavar="SITE", help="stop this site's processes only")
    d.add_argument("--timeout", type=float, default=10.0, help="seconds before SIGKILL (default 10)")
    d.add_argument("--json", action="store_true")
    d.set_defaults(handler=run_down)

    e = cs.add_parser("secrets", help="draw the link seeds of a cluster across hosts, once: copy the file "
                                      "(STATE/secrets.json) with ca/ca.pem to every host")
    e.add_argument("config", type=Path, nargs="?", help="cluster file (default: deploy/local.toml)")
    _state_arg(e)
    e.add_argument("--force", action="store_true",
                   help="replace an existing secrets.json (every site then needs the new one)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(handler=run_secrets)

    k = sub.add_parser("kme", help="key management entity process")
    ks = k.add_subparsers(dest="kme_command", metavar="KME_COMMAND")
    ks.required = True
    ksv = ks.add_parser("serve", help="run one site's KME of a started cluster (as `qstore cluster up` does)")
    ksv.add_argument("config", type=Path, nargs="?", help="cluster file (default: cluster.json's)")
    ksv.add_argument("--site", required=True)
    _state_arg(ksv)
    ksv.add_argument("--port", type=int, help="listen here (default: the port of its URL in cluster.json)")
    ksv.set_defaults(handler=run_kme_serve)


def run_up(args: argparse.Namespace) -> int:
    from client import cluster
    from qstore.cluster import state_dir

    root = state_dir(args.state)
    nodes = not args.no_nodes
    if nodes and (missing := cluster.node_command_missing()) is not None:
        print(f"qstore: starting the KMEs only: {missing}", file=sys.stderr)
        nodes = False
    state = cluster.up(args.config, root, nodes=nodes, gateway=not args.no_gateway, timeout_s=args.timeout,
                       only=args.only, gateway_port=args.gateway_port)
    if args.json:
        print(json.dumps({**state.to_json(), "state": str(root)}))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"cluster {state.name}: k = {state.k}, n = {state.n}")
    for col in ("site", "KME", "node") + (("runs",) if args.only else ()):
        table.add_column(col)
    for row in cluster.summary(state):
        table.add_row(*row, *(("here" if row[0] == args.only else "elsewhere",) if args.only else ()))
    Console().print(table)
    gw = cluster.gateway_of(state)
    if gw is not None and gw.get("pid"):
        print(f"S3 gateway: {gw['url']}  (keys: `qstore s3 credentials`)")
    elif gw is not None:
        print(f"S3 gateway: {gw['url']}  (on another host)")
    print(f"state: {root}  (`qstore cluster status`, `qstore cluster down`)")
    return 0


def _figures_text(f: dict[str, float] | None) -> str:
    if not f:
        return "-"
    text = f"{f['requests']:.0f} req, {f['errors']:.0f} err"
    if "objects" in f:
        text += (f", {f['objects']:.0f} objects, {f['stored_bytes'] / 2**20:.1f} MiB, "
                 f"{f['mpc_queries']:.0f} MPC queries")
    if "key_delivered_bytes" in f:
        text += f", {f['key_delivered_bytes'] / 2**20:.1f} MiB key out"
    return text


def run_status(args: argparse.Namespace) -> int:
    from client import cluster
    from qstore.cluster import state_dir

    report = cluster.status(state_dir(args.state))
    ok = 0 if cluster.healthy(report) else 1
    if args.json:
        print(json.dumps(report))
        return ok
    from rich.console import Console
    from rich.table import Table

    console = Console()
    procs = Table(title=f"cluster {report['name']} ({report['state']})")
    for col in ("process", "pid", "alive", "url", "health"):
        procs.add_column(col, no_wrap=True)
    figures = Table(title="what each process counts (its /metrics)")
    for col in ("process", "figures"):
        figures.add_column(col, no_wrap=True)
    for p in report["processes"]:
        if p.get("local", True):
            alive, health = ("yes" if p["alive"] else "NO"), p["health"]
        else:  # another host's: only its health endpoint tells
            alive, health = "remote", "reachable" if p["reachable"] else f"UNREACHABLE: {p['health']}"
        procs.add_row(p["id"], str(p["pid"] or "-"), alive, p["url"], health)
        figures.add_row(p["id"], _figures_text(p.get("figures")))
    console.print(procs)
    console.print(figures)
    links = Table(title="QKD links: key in the pool of each direction, and key handed out")
    for col in ("link a-b", "rate", "pool a→b", "pool b→a", "sent a→b", "sent b→a"):
        links.add_column(col, no_wrap=True)
    for lk in report["links"]:
        ab, ba = lk[f"{lk['a']}->{lk['b']}"] or {}, lk[f"{lk['b']}->{lk['a']}"] or {}
        shown = [cluster.bits_text(d.get(name))
                 for name in ("available_bits", "delivered_bits") for d in (ab, ba)]
        links.add_row(f"{lk['a']}-{lk['b']}", cluster.rate_text(lk["rate_bps"]), *shown)
    console.print(links)
    return ok


def run_down(args: argparse.Namespace) -> int:
    from client import cluster
    from qstore.cluster import state_dir

    result = cluster.down(state_dir(args.state), timeout_s=args.timeout, only=args.only)
    if args.json:
        print(json.dumps({"state": str(result.state_dir), "was_running": result.was_running,
                          "stopped": list(result.stopped)}))
    elif not result.was_running:
        print(f"no cluster in {result.state_dir}")
    else:
        print(f"stopped {len(result.stopped)} processes; certificates and node data stay in "
              f"{result.state_dir}")
    return 0


def run_secrets(args: argparse.Namespace) -> int:
    from client import cluster
    from qstore.cluster import state_dir

    made = cluster.new_secrets(args.config, state_dir(args.state), force=args.force)
    if args.json:
        print(json.dumps(made))
        return 0
    print(f"wrote {made['secrets']} (mode 0600): seeds of {made['links']} links and {made['sites']} sites of "
          f"cluster {made['cluster']}")
    print("copy it, with ca/ca.pem, into the state directory of every host, then `qstore cluster up CONFIG "
          "--only SITE` there; a site never starts twice with the same secrets")
    return 0


def run_kme_serve(args: argparse.Namespace) -> int:
    import logging

    from client import cluster
    from qstore.cluster import state_dir

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    config = cluster.kme_config_for(args.config, args.site, state_dir(args.state), port=args.port)
    cluster.serve_kme(config)
    return 0
