"""`qstore table ...`, `qstore stats OP ...` and `qstore sql "..."`: secret-shared tables and statistics.

Identity: every command acts as one SAE of the cluster (``--as SAE`` or
``$QSTORE_SAE``, default ``client``): tables belong to the SAE that uploads
them, queries are checked against that SAE's grants. Results print as a
table with the rows used and the QKD key the query spent, or one JSON
object per result with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

from client.storage_cli import _human, _progress, _run, _state_arg
from qstore.errors import LocalError

T = TypeVar("T")
OPS = ("count", "sum", "mean", "var", "std", "min", "max", "median", "quantile", "histogram", "crosstab",
       "cov", "corr", "linreg", "ttest", "chi2")


def _identity(p: argparse.ArgumentParser) -> None:
    _state_arg(p)
    p.add_argument("--as", dest="sae", metavar="SAE",
                   help="act as this SAE of the cluster (default: $QSTORE_SAE or 'client')")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def add_parsers(sub: Any) -> None:
    t = sub.add_parser("table", help="secret-shared tables: put, ls, describe, rm, grant, revoke, audit")
    ts = t.add_subparsers(dest="table_command", required=True, metavar="ACTION")
    p = ts.add_parser("put", help="upload a CSV as a secret-shared table owned by you")
    p.add_argument("csv", type=Path, help="the data (header row, one row per record)")
    p.add_argument("--name", required=True, help="table name")
    p.add_argument("--schema", required=True, type=Path, help="schema (TOML: [table], [columns])")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    _identity(p)
    p.set_defaults(handler=run_table_put)
    ls = ts.add_parser("ls", help="list tables (owner, rows, columns)")
    _identity(ls)
    ls.set_defaults(handler=run_table_ls)
    d = ts.add_parser("describe", help="a table's schema, owner, row count and grants")
    d.add_argument("name")
    _identity(d)
    d.set_defaults(handler=run_table_describe)
    r = ts.add_parser("rm", help="remove a table (owner only)")
    r.add_argument("name")
    _identity(r)
    r.set_defaults(handler=run_table_rm)
    for action, helptext in (("grant", "let an analyst query a table (owner only)"),
                             ("revoke", "take an analyst's right back (owner only)")):
        g = ts.add_parser(action, help=helptext)
        g.add_argument("name")
        g.add_argument("analyst", help="the analyst's SAE ID")
        _identity(g)
        g.set_defaults(handler=run_table_grant, revoke=action == "revoke")
    a = ts.add_parser("audit", help="the nodes' audit log of queries on your tables and by you")
    a.add_argument("--limit", type=int, default=20)
    _identity(a)
    a.set_defaults(handler=run_table_audit)

    s = sub.add_parser("stats", help="a statistic computed by MPC on secret-shared tables")
    s.add_argument("op", choices=OPS, metavar="OP", help=", ".join(OPS))
    s.add_argument("columns", nargs="*", help="the column(s) the operation takes")
    s.add_argument("--table", "-t", required=True, help="table, or a,b,c for the union of same-schema tables")
    s.add_argument("--where", "-w", help="filter, e.g. \"sex = 'M' AND age >= 40\"")
    s.add_argument("--group-by", "-g", action="append", default=[], help="categorical/boolean column")
    s.add_argument("--q", help="quantile in [0, 1] (quantile)")
    s.add_argument("--bins", help="histogram bin edges, comma-separated (default: 10 bins)")
    s.add_argument("--mu", help="mean under the null hypothesis (one-sample ttest)")
    s.add_argument("--join", metavar="TABLE", help="equi-join with this table ...")
    s.add_argument("--on", metavar="ID_COLUMN", help="... on this id column")
    _identity(s)
    s.set_defaults(handler=run_stats)

    q = sub.add_parser("sql", help="statistics in SQL (SELECT aggregates FROM t WHERE ... GROUP BY ...)")
    q.add_argument("statement")
    _identity(q)
    q.set_defaults(handler=run_sql)


def _quiet_parser() -> None:
    """sqlglot warns on stderr about some malformed input before our own one-line error: not on the CLI."""
    import logging

    logging.getLogger("sqlglot").setLevel(logging.ERROR)


def _tables(args: argparse.Namespace, go: Any) -> Any:
    from client.storage import QStore

    sae = args.sae or os.environ.get("QSTORE_SAE") or "client"

    async def run() -> Any:
        async with QStore.open(args.state, sae_id=sae) as qs:
            return await go(qs.tables())

    return _run(run())


def _out(args: argparse.Namespace, doc: Any, text: str) -> None:
    print(json.dumps(doc, indent=2, default=str) if args.json else text)


def run_table_put(args: argparse.Namespace) -> int:
    from qstore.tables import Schema

    try:
        schema = Schema.from_toml(args.schema.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LocalError(f"no schema file {args.schema}") from None
    if not args.csv.is_file():
        raise LocalError(f"no CSV file {args.csv}")

    async def go(tables: Any) -> Any:
        with _progress(args, None, f"table {args.name}") as progress:
            return await tables.put(args.name, args.csv, schema, progress=progress)

    info = _tables(args, go)
    _out(args, info, f"table {info['name']}: {info['rows']} rows, {len(info['schema']['columns'])} columns, "
                     f"owner {info['owner']}, secret-shared on every node")
    return 0


def run_table_ls(args: argparse.Namespace) -> int:
    found = _tables(args, lambda t: t.list())
    lines = [f"{'TABLE':<24} {'OWNER':<16} {'ROWS':>10}  COLUMNS"]
    for t in found:
        cols = ", ".join(c["name"] for c in t["schema"]["columns"])
        lines.append(f"{t['name']:<24} {t['owner']:<16} {t['rows']:>10}  {cols}")
    _out(args, found, "\n".join(lines) if found else "no tables")
    return 0


def run_table_describe(args: argparse.Namespace) -> int:
    info = _tables(args, lambda t: t.describe(args.name))
    lines = [f"table {info['name']}  owner {info['owner']}  rows {info['rows']}  "
             f"min_group_size {info['schema'].get('min_group_size', 10)}",
             f"grants: {', '.join(info['grants']) or '(none)'}", "columns:"]
    for col in info["schema"]["columns"]:
        extra = {k: v for k, v in col.items() if k not in ("type", "name")}
        lines.append(f"  {col['name']:<20} {col['type']:<12} {json.dumps(extra) if extra else ''}")
    _out(args, info, "\n".join(lines))
    return 0


def run_table_rm(args: argparse.Namespace) -> int:
    _tables(args, lambda t: t.drop(args.name))
    _out(args, {"removed": args.name}, f"table {args.name} removed from every node")
    return 0


def run_table_grant(args: argparse.Namespace) -> int:
    info = _tables(args, lambda t: t.grant(args.name, args.analyst, revoke=args.revoke))
    verb = "revoked from" if args.revoke else "granted to"
    grants = ", ".join(info["grants"]) or "-"
    _out(args, info, f"queries on {args.name} {verb} {args.analyst}; grants: {grants}")
    return 0


def run_table_audit(args: argparse.Namespace) -> int:
    by_node = _tables(args, lambda t: t.audit(args.limit))
    lines = []
    for site, entries in sorted(by_node.items()):
        lines.append(f"{site}:")
        for e in entries:
            lines.append(f"  #{e['id']} {e['analyst']} {e['query'].get('op')} on {','.join(e['tables'])}: "
                         f"{e['status']}, {e['key_spent_bytes']} B key")
    _out(args, by_node, "\n".join(lines) or "no entries")
    return 0


def _decimal(text: str | None, what: str) -> Decimal | None:
    if text is None:
        return None
    try:
        return Decimal(text)
    except InvalidOperation:
        raise LocalError(f"{what} must be a number, not {text!r}") from None


def query_of(args: argparse.Namespace) -> Any:
    """The Query the `qstore stats` arguments describe (QueryError/LocalError when they do not)."""
    from qstore.query import Join, Query, parse_where

    _quiet_parser()
    tables = tuple(t.strip() for t in args.table.split(",") if t.strip())
    q = None
    if args.q is not None:
        try:
            q = Fraction(args.q)
        except (ValueError, ZeroDivisionError):
            raise LocalError(f"--q must be a number in [0, 1], not {args.q!r}") from None
    if args.op == "quantile" and q is None:
        raise LocalError("quantile needs --q (e.g. --q 0.9)")
    bins = None
    if args.bins:
        bins = tuple(_decimal(b.strip(), "--bins") for b in args.bins.split(","))
    if (args.join is None) != (args.on is None):
        raise LocalError("--join TABLE and --on COLUMN go together")
    return Query(op=args.op, tables=tables, columns=tuple(args.columns),
                 where=parse_where(args.where) if args.where else None, group_by=tuple(args.group_by), q=q,
                 bins=bins, mu=_decimal(args.mu, "--mu"),
                 join=Join(table=args.join, on=args.on) if args.join else None)


def _fmt(v: Any) -> str:
    if v is None:
        return "suppressed"
    if isinstance(v, float):
        return f"{v:.10g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items() if k not in ("mean",))
    return str(v)


def _exact(r: Any) -> str:
    """The value as printed: exact fractions as decimals to 10 significant digits (correctly rounded)."""
    if r.suppressed:
        return "suppressed"
    if isinstance(r.exact, Fraction):
        return _fraction_text(r.exact)
    if isinstance(r.exact, dict):
        return ", ".join(f"{k}={_fraction_text(x) if isinstance(x, Fraction) else _fmt(x)}"
                         for k, x in r.exact.items() if k != "mean")
    return _fmt(r.value)


def _fraction_text(v: Fraction, digits: int = 10) -> str:
    """``v`` to ``digits`` significant digits, correctly rounded (an integer exactly)."""
    if v.denominator == 1:
        return str(v.numerator)
    from decimal import localcontext

    with localcontext() as ctx:
        ctx.prec = digits
        text = str(Decimal(v.numerator) / Decimal(v.denominator))
    return text.rstrip("0").rstrip(".") if "." in text and "E" not in text else text


def print_results(args: argparse.Namespace, results: Any, label: str) -> None:
    if args.json:
        for r in results:
            print(json.dumps(r.to_json(), default=str))
        return
    rep = results.report
    rows = [("group", "value", "rows")]
    for r in results:
        group = ", ".join(f"{k}={v}" for k, v in r.group.items()) if r.group else "-"
        rows.append((group, _exact(r), "-" if r.rows is None else str(r.rows)))
    w0 = max(len(a) for a, _, _ in rows)
    w1 = max(len(b) for _, b, _ in rows)
    print(label)
    for a, b, c in rows:
        print(f"  {a:<{w0}}  {b:<{w1}}  {c:>8}")
    print(f"  {len(rep.nodes)} nodes, {rep.rounds} rounds, {rep.seconds:.2f} s, "
          f"QKD key spent {_human(rep.key_spent_bytes)}")


def _describe(q: Any) -> str:
    from qstore.query import describe

    return describe(q)


def run_stats(args: argparse.Namespace) -> int:
    query = query_of(args)
    results = _tables(args, lambda t: t.query(query))
    print_results(args, results, _describe(query))
    return 0


def run_sql(args: argparse.Namespace) -> int:
    from qstore.query import parse_sql

    _quiet_parser()
    queries = parse_sql(args.statement)

    async def go(tables: Any) -> list[Any]:
        return [await tables.query(q) for q in queries]

    for q, results in zip(queries, _tables(args, go), strict=True):
        print_results(args, results, _describe(q))
    return 0
