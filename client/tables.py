"""Secret-shared tables and statistics on them: the analyst's and the data owner's side.

Upload: the CSV is checked against its schema and encoded entirely before a
single share leaves the client (a bad cell names its line and column and
nothing is stored). Each stored column is then Shamir-shared over F_p with
threshold t = k - 1, column by column and in parts of at most
:data:`PART_ROWS` rows (memory stays bounded), sealed for each node with
QKD key and sent; every node must take the table, then all commit.

Query: the client names the parties (every node that answers its health
check; MPC needs 2t+1), sends them the query, and gets back from each one
envelope of result shares sealed for this SAE. It reconstructs every output
from t+1 shares, checks the others agree, and finishes the statistics
exactly (:mod:`qstore.mpc.finish`). Nodes learn only the query.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from client.storage import NodeError, QStore, QuorumError, Refused, _Node, _why
from qkd_sim.envelope_keys import envelope_keys, opening_keys
from qstore import field as F
from qstore import otp
from qstore.errors import QStoreError, RemoteError, SealError

PART_ROWS = 1 << 19  # rows per sealed column part: 8 MiB of shares per node
HEALTH_TIMEOUT_S = 5.0

Progress = Callable[[int], None]


class StatsError(RemoteError):
    """A query could not run (too few nodes, a node failed mid-query, results that do not agree)."""

    status = 502


@dataclass
class QueryReport:
    """What a query cost: nodes, rounds, time and QKD key (node-to-node plus the results' links)."""

    nodes: list[str] = field(default_factory=list)
    rounds: int = 0
    seconds: float = 0.0
    key_spent_bytes: int = 0
    bytes_sent: int = 0


class ResultSet(list):  # type: ignore[type-arg]
    """The results of one query (one per group, bin or cell), with :attr:`report`."""

    report: QueryReport

    @property
    def value(self) -> Any:
        """The value of the only result (ValueError when there are several)."""
        if len(self) != 1:
            raise ValueError(f"{len(self)} results (grouped): read each one's .value")
        return self[0].value

    def to_json(self) -> list[dict[str, Any]]:
        return [r.to_json() for r in self]


def _seal_for(stream: otp.KeyStream, data: bytes) -> bytes:
    try:
        return bytes(otp.seal_parts(data, stream))
    finally:
        stream.wipe()


class Tables:
    """Tables of one cluster through a connected :class:`~client.storage.QStore`."""

    def __init__(self, qs: QStore):
        self.qs = qs
        self.t = max(1, qs.k - 1)

    # -- catalog --------------------------------------------------------------------------

    async def _everywhere(self, call: Callable[[_Node], Awaitable[Any]], what: str) -> dict[str, Any]:
        ok, failed = await self.qs._each(self.qs.nodes, call)
        if failed:
            raise QuorumError(f"{what} failed on " + _why(failed))
        return ok

    async def list(self) -> list[dict[str, Any]]:
        """Every table (public facts: owner, schema, rows, grants) as the nodes agree on it."""
        ok, failed = await self.qs._each(self.qs.nodes, lambda nd: nd.call("GET", "/v1/tables"))
        if len(ok) < self.qs.k:
            raise QuorumError("fewer than k nodes answered: " + _why(failed))
        seen: dict[str, list[dict[str, Any]]] = {}
        for answer in ok.values():
            for t in answer["tables"]:
                seen.setdefault(t["name"], []).append(t)
        return [copies[0] for _, copies in sorted(seen.items()) if len(copies) >= self.qs.k]

    async def describe(self, name: str) -> dict[str, Any]:
        ok, failed = await self.qs._each(self.qs.nodes, lambda nd: nd.call("GET", f"/v1/tables/{name}"))
        if not ok:
            _raise_first(failed)
        return next(iter(ok.values()))

    async def drop(self, name: str) -> None:
        """Remove table ``name`` from every node (owner only)."""
        await self._everywhere(lambda nd: nd.call("DELETE", f"/v1/tables/{name}"), f"removing {name!r}")

    async def grant(self, name: str, analyst: str, *, revoke: bool = False) -> dict[str, Any]:
        """Let ``analyst`` (an SAE ID) query table ``name`` (owner only); ``revoke`` takes it back."""
        ok = await self._everywhere(
            lambda nd: nd.call("POST", f"/v1/tables/{name}/grants",
                               body={"analyst": analyst, "revoke": revoke}),
            f"{'revoking' if revoke else 'granting'} on {name!r}")
        return next(iter(ok.values()))

    async def audit(self, limit: int = 100) -> dict[str, list[dict[str, Any]]]:
        """Each node's audit entries that concern this SAE (its queries, queries on its tables)."""
        ok, _ = await self.qs._each(self.qs.nodes,
                                    lambda nd: nd.call("GET", "/v1/mpc/audit", params={"limit": limit}))
        return {site: answer["entries"] for site, answer in ok.items()}

    # -- upload ---------------------------------------------------------------------------

    async def put(self, name: str, data: str | bytes | Path, schema: Any, *,
                  progress: Progress | None = None) -> dict[str, Any]:
        """Upload a CSV (a path, or its text) as table ``name`` under ``schema`` (a Schema or TOML text/path).

        The whole CSV is checked first; then every node must take the table.
        """
        from qstore.mpc import shamir
        from qstore.tables import Schema, encode_csv

        if isinstance(schema, Path):
            schema = Schema.from_toml(schema.read_text(encoding="utf-8"))
        elif isinstance(schema, str):
            schema = Schema.from_toml(schema)
        if isinstance(data, Path):
            with open(data, encoding="utf-8", newline="") as fh:
                table = encode_csv(fh, schema)
        else:
            table = encode_csv(data.decode("utf-8") if isinstance(data, bytes) else data, schema)
        columns = list(schema.stored_columns())
        nodes = self.qs.nodes
        xs = [nd.info.x for nd in nodes]
        upload_id = uuid.uuid4().hex
        begin = {"upload_id": upload_id, "name": name, "schema": schema.to_json(), "columns": columns,
                 "rows": table.rows}
        try:
            await self._everywhere(lambda nd: nd.call("POST", "/v1/tables/uploads", body=begin),
                                   f"uploading {name!r}")
            for i, col in enumerate(columns):
                values = table.columns[col]
                for start in range(0, table.rows, PART_ROWS):
                    part = values[start : start + PART_ROWS]
                    vec = F.from_ints(part) if isinstance(part, np.ndarray) and part.dtype != object \
                        else F.from_ints([int(v) for v in part])
                    shares = shamir.share(vec, xs, self.t)
                    await self._send_part(nodes, upload_id, i, start, shares)
                    if progress is not None:
                        progress(len(part))
            infos = await self._everywhere(
                lambda nd: nd.call("POST", f"/v1/tables/uploads/{upload_id}/commit"), f"committing {name!r}")
        except BaseException:
            await self.qs._each(nodes, lambda nd: nd.call("DELETE", f"/v1/tables/uploads/{upload_id}"))
            raise
        return next(iter(infos.values()))

    async def _send_part(self, nodes: list[_Node], upload_id: str, column: int, row: int,
                         shares: Mapping[int, F.Vec]) -> None:
        async def one(nd: _Node) -> None:
            data = F.to_bytes(shares[nd.info.x])
            stream = await envelope_keys(self.qs.sae, nd.info.id, otp.key_cost("otp", len(data)))
            envelope = _seal_for(stream, data)
            await nd.call("PUT", f"/v1/tables/uploads/{upload_id}/columns/{column}", params={"row": str(row)},
                          data=envelope)

        await self._everywhere(one, "sending column shares")

    # -- queries --------------------------------------------------------------------------

    def table(self, *names: str) -> TableRef:
        return TableRef(self, tuple(names))

    async def _parties(self) -> list[_Node]:
        async def health(nd: _Node) -> Any:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                return await nd.call("GET", "/v1/health")

        ok, failed = await self.qs._each(self.qs.nodes, health)
        live = [nd for nd in self.qs.nodes if nd.site in ok]
        if len(live) < 2 * self.t + 1:
            down = "; ".join(f"{s}: {m}" for s, m in sorted(failed.items()))
            raise StatsError(f"statistics need {2 * self.t + 1} nodes (2t+1, t = {self.t}); "
                             f"only {len(live)} answer ({down})")
        return live

    async def _schema(self, query: Any) -> Any:
        from qstore.tables import Schema, join_schema, union_schema

        names = list(query.tables) + ([query.join.table] if query.join is not None else [])
        infos = await asyncio.gather(*(self.describe(n) for n in names))
        schema = union_schema([Schema.from_json(i["schema"]) for i in infos[: len(query.tables)]])
        if query.join is not None:
            schema = join_schema(schema, Schema.from_json(infos[-1]["schema"]), query.join.on)
        return schema

    async def query(self, query: Any) -> ResultSet:
        """Run ``query`` (a :class:`qstore.query.Query`); its results, reconstructed here."""
        from qstore.mpc import engine, finish, shamir

        started = time.perf_counter()
        schema, parties = await asyncio.gather(self._schema(query), self._parties())
        query_id = uuid.uuid4().hex
        body = {"query_id": query_id, "query": query.to_json(), "parties": [nd.info.x for nd in parties]}

        async def ask(nd: _Node) -> tuple[dict[str, Any], list[F.Vec]]:
            headers: dict[str, str] = {}
            envelope = await nd.call("POST", "/v1/mpc/queries", body=body, raw=True, reply_headers=headers)
            try:
                info = json.loads(headers.get("X-QStore-Result", ""))
                refs = otp.parse_envelope_refs(envelope)
                stream = await opening_keys(self.qs.sae, nd.info.id, refs)
                try:
                    payload = otp.open_(envelope, stream)
                finally:
                    stream.wipe()
                return info, engine.decode_payload(payload, 1 << 24)
            except (ValueError, QStoreError) as exc:
                if isinstance(exc, SealError):
                    raise
                raise NodeError(nd.site, f"sent an unreadable result ({type(exc).__name__})") from None

        outcomes = await asyncio.gather(*(ask(nd) for nd in parties), return_exceptions=True)
        failed = {nd.site: out for nd, out in zip(parties, outcomes, strict=True)
                  if isinstance(out, BaseException)}
        if failed:
            for out in failed.values():
                if not isinstance(out, QStoreError | TimeoutError | OSError):
                    raise out
            _raise_first({s: str(e) for s, e in failed.items()}, errors=failed)
        answers = {nd.info.x: out for nd, out in zip(parties, outcomes, strict=True)}
        names = {tuple(info["outputs"]) for info, _ in answers.values()}
        if len(names) != 1:
            raise StatsError("the nodes returned different result sets")
        (out_names,) = names
        opened: dict[str, list[int]] = {}
        for i, name in enumerate(out_names):
            shares = {x: vecs[i] for x, (_, vecs) in answers.items()}
            if len({v.shape for v in shares.values()}) != 1:
                raise StatsError(f"result {name!r}: the nodes' shares differ in shape")
            if not shamir.consistent(shares, self.t):
                raise StatsError(f"result {name!r}: the nodes' shares do not agree (a node computed wrongly)")
            opened[name] = F.to_signed(shamir.reconstruct(shares))
        report = QueryReport(nodes=[nd.site for nd in parties],
                             rounds=max(info["rounds"] for info, _ in answers.values()),
                             key_spent_bytes=sum(int(info["key_spent"]) for info, _ in answers.values()),
                             bytes_sent=sum(int(info["bytes_sent"]) for info, _ in answers.values()))
        from qstore.mpc.join import without_join

        results = ResultSet(finish.finish(without_join(query), schema, opened))
        report.seconds = time.perf_counter() - started
        for r in results:
            r.key_spent_bytes = report.key_spent_bytes
        results.report = report
        return results


def _raise_first(failed: Mapping[str, str], errors: Mapping[str, BaseException] | None = None) -> None:
    """Raise what the nodes said: their common refusal as such, else every node's reason."""
    if errors:
        refusals = {(getattr(e, "name", ""), getattr(e, "node_status", None),
                     str(e).split(": ", 1)[-1]) for e in errors.values() if isinstance(e, NodeError)}
        if len(refusals) == 1 and len(errors) > 0:
            ((name, status, message),) = refusals
            if status is not None and 400 <= status < 500:
                raise Refused(message, status=status, name=name)
        for e in errors.values():
            if isinstance(e, NodeError) and e.node_status is not None and 400 <= e.node_status < 500:
                raise Refused(str(e), status=e.node_status, name=e.name)
    raise StatsError("; ".join(f"{s}: {m}" for s, m in sorted(failed.items())) or "no node answered")


class TableRef:
    """A query builder: ``await qs.table("patients").where(sex="M").group_by("site").mean("weight")``.

    Each aggregate returns a :class:`ResultSet` (``.value`` when there is one result).
    """

    def __init__(self, tables: Tables, names: tuple[str, ...], where: Any = None,
                 group_by: tuple[str, ...] = (), join: Any = None):
        if not names:
            raise ValueError("name at least one table")
        self._tables, self._names, self._where = tables, names, where
        self._group_by, self._join = group_by, join

    def where(self, expr: str | None = None, **equal: Any) -> TableRef:
        """Add a filter: an expression (``"age >= 40 AND sex = 'F'"``) and/or column=value equalities."""
        from qstore.query import And, Compare, parse_where

        items = [] if self._where is None else [self._where]
        if expr is not None:
            items.append(parse_where(expr))
        for col, value in equal.items():
            items.append(Compare(column=col, op="=", value=_literal(value)))
        new = None if not items else items[0] if len(items) == 1 else And(items=tuple(items))
        return TableRef(self._tables, self._names, new, self._group_by, self._join)

    def group_by(self, *columns: str) -> TableRef:
        return TableRef(self._tables, self._names, self._where, self._group_by + columns, self._join)

    def join(self, table: str, on: str) -> TableRef:
        from qstore.query import Join

        return TableRef(self._tables, self._names, self._where, self._group_by, Join(table=table, on=on))

    async def run(self, op: str, *columns: str, **params: Any) -> ResultSet:
        from qstore.query import Query

        if "q" in params and params["q"] is not None:
            params["q"] = Fraction(str(params["q"]))
        if "mu" in params and params["mu"] is not None:
            params["mu"] = Decimal(str(params["mu"]))
        if "bins" in params and params["bins"] is not None:
            params["bins"] = tuple(Decimal(str(b)) for b in params["bins"])
        q = Query(op=op, tables=self._names, columns=tuple(columns), where=self._where,
                  group_by=self._group_by, join=self._join,
                  **{k: v for k, v in params.items() if v is not None})
        return await self._tables.query(q)

    async def count(self) -> ResultSet:
        return await self.run("count")

    async def sum(self, column: str) -> ResultSet:
        return await self.run("sum", column)

    async def mean(self, column: str) -> ResultSet:
        return await self.run("mean", column)

    async def var(self, column: str) -> ResultSet:
        return await self.run("var", column)

    async def std(self, column: str) -> ResultSet:
        return await self.run("std", column)

    async def min(self, column: str) -> ResultSet:
        return await self.run("min", column)

    async def max(self, column: str) -> ResultSet:
        return await self.run("max", column)

    async def median(self, column: str) -> ResultSet:
        return await self.run("median", column)

    async def quantile(self, column: str, q: float | str | Fraction) -> ResultSet:
        return await self.run("quantile", column, q=q)

    async def histogram(self, column: str, bins: Iterable[Any] | None = None) -> ResultSet:
        return await self.run("histogram", column, bins=None if bins is None else tuple(bins))

    async def crosstab(self, a: str, b: str) -> ResultSet:
        return await self.run("crosstab", a, b)

    async def cov(self, x: str, y: str) -> ResultSet:
        return await self.run("cov", x, y)

    async def corr(self, x: str, y: str) -> ResultSet:
        return await self.run("corr", x, y)

    async def linreg(self, y: str, *xs: str) -> ResultSet:
        return await self.run("linreg", y, *xs)

    async def ttest(self, column: str, mu: Any = None) -> ResultSet:
        return await self.run("ttest", column, mu=mu)

    async def chi2(self, a: str, b: str) -> ResultSet:
        return await self.run("chi2", a, b)


def _literal(value: Any) -> Any:
    if isinstance(value, float):
        return Decimal(repr(value))
    return value
