"""Statistics on secret-shared tables: a query turned into one MPC program per node.

Every node runs :func:`program` with its own shares and the same public
inputs (query, schema, row count); the program yields the rounds of the
protocols of :mod:`qstore.mpc.protocols` and returns, per result group, one
vector of degree-t shares for the analyst. Nothing is opened to the nodes
but statistically masked values inside the comparison protocols.

Layout of a group's output vector (the analyst's :mod:`qstore.mpc.finish`
reads it with the same :func:`plan`): ``[ok, n, values...]`` where ``ok``
is the secret "not suppressed" bit ([n ≥ min_group_size]) and every other
entry has been multiplied by it, so a suppressed group opens to zeros.

How each operation is computed (all vectorised over rows, no row loops):

* filters: categorical/boolean equalities are indicator columns (free);
  numeric comparisons are one batched comparison protocol; AND/OR are
  products (a + b − ab), NOT is 1 − a;
* groups: products of the filter with each group's indicator (one round);
* count, sum, mean, var, std, cov, corr, linreg, ttest: sums of the
  weights, weighted sums and weighted products, opened to the analyst as
  sufficient statistics (the centred ones, nΣxy − ΣxΣy, are computed inside
  MPC so that the raw Σx² is not revealed);
* min, max, median, quantile: bit decomposition of the column, then the
  order statistics found bit by bit with every decision secret;
* histogram: one comparison per row and bin edge; crosstab, chi2: counts
  of products of indicators.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np

from qstore import field as F
from qstore.errors import RemoteError
from qstore.mpc import protocols as P
from qstore.mpc.engine import Context
from qstore.query import expr_columns

MOMENT_OPS = ("count", "sum", "mean", "var", "std", "ttest", "cov", "corr", "linreg")
ORDER_OPS = ("min", "max", "median", "quantile")
DEFAULT_BINS = 10


class PlanError(RemoteError):
    """The query does not fit the table (unknown column, wrong column type, value outside a domain)."""


@dataclass(frozen=True)
class Group:
    """One result cell: its label (column → value) and the indicator columns whose product selects it."""

    label: Mapping[str, str] | None
    indicators: tuple[tuple[str, bool], ...] = ()  # (stored column, negated)
    bin: tuple[Fraction, Fraction, bool] | None = None  # histogram bin [lo, hi) (closed when the flag is set)


@dataclass(frozen=True)
class Plan:
    """What a query computes, as both the nodes and the analyst must see it."""

    op: str
    variables: tuple[str, ...]  # the numeric columns aggregated (x; or x, y; or x1..xk, y for linreg)
    groups: tuple[Group, ...]
    pairs: tuple[tuple[int, int], ...] = ()  # products of variables whose sums are needed
    quantiles: tuple[Fraction, ...] = ()
    width: int = 0  # values per group after ok and n
    min_group_size: int = 10
    extra: Mapping[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- planning (public, both sides)


def _column(schema: Any, name: str) -> Any:
    try:
        return schema.column(name)
    except (KeyError, LookupError, ValueError, RemoteError):
        raise PlanError(f"no column {name!r} in the table") from None


def _numeric(schema: Any, name: str) -> Any:
    col = _column(schema, name)
    if col.type not in ("integer", "fixed", "boolean"):
        raise PlanError(f"column {name!r} is {col.type}, not numeric")
    return col


def _levels(schema: Any, name: str) -> list[tuple[str, tuple[tuple[str, bool], ...]]]:
    """(label, indicator) of each value of a categorical or boolean column."""
    col = _column(schema, name)
    if col.type == "categorical":
        return [(v, ((f"{name}={v}", False),)) for v in col.values]
    if col.type == "boolean":
        return [("false", ((name, True),)), ("true", ((name, False),))]
    raise PlanError(f"column {name!r} is {col.type}: group only by categorical or boolean columns")


def _bins(schema: Any, query: Any) -> list[Group]:
    col = _numeric(schema, query.columns[0])
    if query.bins is not None:
        edges = [Fraction(b) for b in query.bins]
    else:
        lo, hi = Fraction(col.lo, col.scale), Fraction(col.hi, col.scale)
        edges = [lo + (hi - lo) * i / DEFAULT_BINS for i in range(DEFAULT_BINS + 1)]
    return [Group(label={"bin": f"[{_num(a)}, {_num(b)}{']' if i == len(edges) - 2 else ')'}"},
                  bin=(a, b, i == len(edges) - 2))
            for i, (a, b) in enumerate(itertools.pairwise(edges))]


def _num(v: Fraction) -> str:
    return str(v.numerator) if v.denominator == 1 else str(Decimal(v.numerator) / Decimal(v.denominator))


def plan(query: Any, schema: Any) -> Plan:
    """The plan of ``query`` on tables of ``schema`` (PlanError when they do not fit)."""
    op = query.op
    groups: list[Group] = [Group(label=None)]
    if query.group_by:
        levels = [_levels(schema, g) for g in query.group_by]
        groups = [Group(label={g: lab for g, (lab, _) in zip(query.group_by, combo, strict=True)},
                        indicators=tuple(i for _, ind in combo for i in ind))
                  for combo in itertools.product(*levels)]
    m = schema.min_group_size
    if op == "count":
        return Plan(op=op, variables=(), groups=tuple(groups), min_group_size=m)
    if op in ("sum", "mean"):
        _numeric(schema, query.columns[0])
        return Plan(op=op, variables=(query.columns[0],), groups=tuple(groups), width=1, min_group_size=m)
    if op in ("var", "std"):
        _numeric(schema, query.columns[0])
        return Plan(op=op, variables=(query.columns[0],), groups=tuple(groups), pairs=((0, 0),), width=1,
                    min_group_size=m)
    if op == "ttest":
        _numeric(schema, query.columns[0])
        if query.mu is None and (len(query.group_by) != 1 or len(groups) != 2):
            raise PlanError("ttest needs mu (one-sample) or --group-by a column with two values (Welch)")
        return Plan(op=op, variables=(query.columns[0],), groups=tuple(groups), pairs=((0, 0),), width=2,
                    min_group_size=m)
    if op == "cov":
        for c in query.columns:
            _numeric(schema, c)
        return Plan(op=op, variables=tuple(query.columns), groups=tuple(groups), pairs=((0, 1),), width=1,
                    min_group_size=m)
    if op == "corr":
        for c in query.columns:
            _numeric(schema, c)
        return Plan(op=op, variables=tuple(query.columns), groups=tuple(groups),
                    pairs=((0, 0), (1, 1), (0, 1)),
                    width=3, min_group_size=m)
    if op == "linreg":
        for c in query.columns:
            _numeric(schema, c)
        y, xs = query.columns[0], tuple(query.columns[1:])
        variables = xs + (y,)
        k = len(variables)
        pairs = tuple((i, j) for i in range(k) for j in range(i, k))
        return Plan(op=op, variables=variables, groups=tuple(groups), pairs=pairs, width=k + len(pairs),
                    min_group_size=m)
    if op in ORDER_OPS:
        col = _numeric(schema, query.columns[0])
        q = {"min": Fraction(0), "max": Fraction(1), "median": Fraction(1, 2)}.get(op)
        if q is None:
            q = Fraction(query.q)
        del col
        return Plan(op=op, variables=(query.columns[0],), groups=tuple(groups), quantiles=(q,), width=2,
                    min_group_size=m)
    if op == "histogram":
        if query.group_by:
            raise PlanError("histogram does not combine with group-by")
        return Plan(op=op, variables=(query.columns[0],), groups=tuple(_bins(schema, query)),
                    min_group_size=m)
    if op in ("crosstab", "chi2"):
        if query.group_by:
            raise PlanError(f"{op} does not combine with group-by (it groups by its two columns)")
        a, b = query.columns
        cells = [Group(label={a: la, b: lb}, indicators=ia + ib)
                 for (la, ia), (lb, ib) in itertools.product(_levels(schema, a), _levels(schema, b))]
        return Plan(op=op, variables=(), groups=tuple(cells), min_group_size=m,
                    extra={"shape": (len(_levels(schema, a)), len(_levels(schema, b)))})
    raise PlanError(f"operation {op!r} is not supported")


def columns_needed(query: Any, schema: Any) -> list[str]:
    """The stored columns a node must load for ``query``, each once."""
    p = plan(query, schema)
    names: list[str] = list(p.variables)
    for g in p.groups:
        names += [c for c, _ in g.indicators]
    for c in expr_columns(query.where):
        names += list(_column(schema, c).stored_names())
    return list(dict.fromkeys(names))


REVEALS = {
    "count": "n", "sum": "n, Σx", "mean": "n, Σx", "var": "n, nΣx²−(Σx)²", "std": "n, nΣx²−(Σx)²",
    "ttest": "per group n, Σx, nΣx²−(Σx)²", "cov": "n, nΣxy−ΣxΣy", "corr": "n, Sxx, Syy, Sxy (centred, ×n)",
    "linreg": "n and the normal equations (sums and sums of products of the variables)",
    "min": "n, the minimum", "max": "n, the maximum",
    "median": "n, the two middle order statistics", "quantile": "n, the two order statistics interpolated",
    "histogram": "the count of each bin", "crosstab": "the count of each cell",
    "chi2": "the count of each cell",
}


def revealed(query: Any) -> list[str]:
    """What the analyst learns from ``query`` (for the audit log and the result), besides suppression bits."""
    return [f"{query.op}: {REVEALS.get(query.op, '?')} per group; suppressed groups: only that they are"]


# ---------------------------------------------------------------- filters


def _ones(n: int) -> F.Vec:
    return F.from_int(1, (n,))  # a constant is a valid sharing of itself (degree 0)


def _encoded(col: Any, value: Any) -> Fraction:
    if isinstance(value, bool) or value is None:
        raise PlanError(f"column {col.name!r} compares with numbers, not {value!r}")
    try:
        return Fraction(Decimal(str(value))) * col.scale
    except (ArithmeticError, ValueError):
        raise PlanError(f"column {col.name!r}: {value!r} is not a number") from None


@dataclass
class _Atoms:
    """Comparisons of a filter, batched: every ``x - c`` whose sign is needed, evaluated in one protocol."""

    diffs: list[F.Vec] = field(default_factory=list)
    bits: int = 1

    def need(self, x: F.Vec, c: int, bits: int) -> int:
        self.diffs.append(F.add_const(x, -c))
        self.bits = max(self.bits, bits)
        return len(self.diffs) - 1


def _lt_const(atoms: _Atoms, col: Any, x: F.Vec, c: int) -> int:
    """Index of [x < c] (c clamped to the column's range, so the difference stays within its bits)."""
    c = min(max(c, col.lo - 1), col.hi + 2)
    return atoms.need(x, c, max(1, (col.hi - col.lo + 2).bit_length()))  # |x - c| ≤ hi - lo + 2 < 2^bits


def _compile(expr: Any, schema: Any, data: Mapping[str, F.Vec], rows: int, atoms: _Atoms) -> Any:
    """The filter as a tree whose leaves are ("lin", vector) or ("cmp", [(coef, atom)], const)."""
    kind = type(expr).__name__
    if kind in ("And", "Or"):
        return (kind, [_compile(i, schema, data, rows, atoms) for i in expr.items])
    if kind == "Not":
        return ("Not", [_compile(expr.item, schema, data, rows, atoms)])
    col = _column(schema, expr.column)
    op, value = expr.op, expr.value
    if col.type == "categorical":
        if op not in ("=", "!="):
            raise PlanError(f"column {col.name!r} is categorical: only = and != apply")
        if str(value) not in col.values:
            raise PlanError(f"column {col.name!r} has no value {value!r} "
                            f"(its values: {', '.join(col.values)})")
        ind = data[f"{col.name}={value}"]
        return ("lin", ind if op == "=" else F.sub(_ones(rows), ind))
    if col.type == "id":
        raise PlanError(f"column {col.name!r} is an id: it can only be joined on")
    if col.type == "boolean" and isinstance(value, bool | str) and str(value).lower() in ("true", "false"):
        truth = str(value).lower() == "true"
        if op not in ("=", "!="):
            raise PlanError(f"column {col.name!r} is boolean: only = and != apply")
        want = truth if op == "=" else not truth
        x = data[col.name]
        return ("lin", x if want else F.sub(_ones(rows), x))
    x = data[col.name]
    v = _encoded(col, value)
    floor_v, ceil_v = math.floor(v), math.ceil(v)
    if op in ("=", "!="):
        if v.denominator != 1:
            terms: list[tuple[int, int]] = []  # never equal: 0 (or 1 for !=)
            return ("cmp", terms, 0 if op == "=" else 1)
        le, lt = _lt_const(atoms, col, x, floor_v + 1), _lt_const(atoms, col, x, floor_v)
        return ("cmp", [(1, le), (-1, lt)], 0) if op == "=" else ("cmp", [(-1, le), (1, lt)], 1)
    if op == "<":
        return ("cmp", [(1, _lt_const(atoms, col, x, ceil_v))], 0)
    if op == "<=":
        return ("cmp", [(1, _lt_const(atoms, col, x, floor_v + 1))], 0)
    if op == ">":
        return ("cmp", [(-1, _lt_const(atoms, col, x, floor_v + 1))], 1)
    if op == ">=":
        return ("cmp", [(-1, _lt_const(atoms, col, x, ceil_v))], 1)
    raise PlanError(f"comparison {op!r} is not supported")


def _evaluate(ctx: Context, tree: Any, bits: F.Vec | None, rows: int) -> Generator[Any, Any, F.Vec]:
    kind = tree[0]
    if kind == "lin":
        return tree[1]
    if kind == "cmp":
        _, terms, const = tree
        out = F.from_int(const, (rows,))
        for coef, i in terms:
            assert bits is not None
            out = F.add(out, F.scale(bits[i], coef))
        return out
    items = []
    for sub in tree[1]:
        items.append((yield from _evaluate(ctx, sub, bits, rows)))
    if kind == "Not":
        return F.sub(_ones(rows), items[0])
    acc = items[0]
    for nxt in items[1:]:
        prod = yield from P.mul(ctx, acc, nxt)
        acc = prod if kind == "And" else F.sub(F.add(acc, nxt), prod)
    return acc


def filter_vector(ctx: Context, expr: Any, schema: Any, data: Mapping[str, F.Vec],
                  rows: int) -> Generator[Any, Any, F.Vec | None]:
    """Shares of the 0/1 filter of ``expr`` over the rows (None when there is no filter)."""
    if expr is None:
        return None
    atoms = _Atoms()
    tree = _compile(expr, schema, data, rows, atoms)
    bits = None
    if atoms.diffs:
        stacked = np.stack(atoms.diffs)
        bits = yield from P.ltz(ctx, stacked, atoms.bits)
    return (yield from _evaluate(ctx, tree, bits, rows))


# ---------------------------------------------------------------- the program


def _weights(ctx: Context, p: Plan, f: F.Vec | None, data: Mapping[str, F.Vec],
             rows: int) -> Generator[Any, Any, F.Vec | None]:
    """(G, N) shares of each group's row weights (filter × group indicators); None: every row, one group."""
    if len(p.groups) == 1 and not p.groups[0].indicators and p.groups[0].bin is None:
        return None if f is None else f[None]
    inds = []
    for g in p.groups:
        vecs = [F.sub(_ones(rows), data[c]) if neg else data[c] for c, neg in g.indicators]
        inds.append(vecs)
    # products of up to two indicators (two group-by columns, or a crosstab cell), then the filter
    width = max(len(v) for v in inds)
    cur = [v[0] if v else _ones(rows) for v in inds]
    for level in range(1, width):
        idx = [i for i, v in enumerate(inds) if len(v) > level]
        if idx:
            left, right = np.stack([cur[i] for i in idx]), np.stack([inds[i][level] for i in idx])
            prod = yield from P.mul(ctx, left, right)
            for j, i in enumerate(idx):
                cur[i] = prod[j]
    w = np.stack(cur)
    if f is not None:
        w = yield from P.mul(ctx, w, np.broadcast_to(f, w.shape).copy())
    return w


def _ok_bits(ctx: Context, n: F.Vec, p: Plan, rows: int) -> Generator[Any, Any, F.Vec]:
    """Shares of [n ≥ min_group_size] per group (a comparison; nothing opened)."""
    bits = max(rows, p.min_group_size, 1).bit_length()  # -m ≤ n - m ≤ rows: |n - m| < 2^bits
    below = yield from P.ltz(ctx, F.add_const(n, -p.min_group_size), bits)
    return F.sub(_ones(n.shape[0]), below)


def program(ctx: Context, query: Any, schema: Any, data: Mapping[str, F.Vec], rows: int,
            **_: Any) -> Generator[Any, Any, dict[str, F.Vec]]:
    """This node's part of ``query``: returns {"g<i>": shares of [ok, n, values...]} per group."""
    p = plan(query, schema)
    f = yield from filter_vector(ctx, query.where, schema, data, rows)
    if query.op == "histogram":
        vals, n = yield from _histogram(ctx, p, schema, f, data, rows)
    else:
        w = yield from _weights(ctx, p, f, data, rows)
        if query.op in ORDER_OPS:
            vals, n = yield from _order(ctx, p, schema, w, data, rows)
        else:
            vals, n = yield from _moments(ctx, p, w, data, rows)
    if f is None and len(p.groups) == 1 and not p.groups[0].indicators and p.groups[0].bin is None:
        ok = F.from_int(int(rows >= p.min_group_size), (1,))  # every row: n = rows is public
    else:
        ok = yield from _ok_bits(ctx, n, p, rows)
    body = np.concatenate([n[:, None], vals], axis=1) if vals.shape[1] else n[:, None]
    masked = yield from P.mul(ctx, np.broadcast_to(ok[:, None], body.shape).copy(), body)
    return {f"g{i}": np.concatenate([ok[i : i + 1], masked[i]]) for i in range(len(p.groups))}


def _moments(ctx: Context, p: Plan, w: F.Vec | None, data: Mapping[str, F.Vec],
             rows: int) -> Generator[Any, Any, tuple[F.Vec, F.Vec]]:
    """Per group: n and the values of the plan's layout (sums, centred sums of products)."""
    G = len(p.groups)
    X = np.stack([data[v] for v in p.variables]) if p.variables else F.zeros((0, rows))
    K = X.shape[0]
    pairs = list(p.pairs)
    if w is None:
        n = F.from_int(rows, (1,))
        s1 = F.total(X)[None] if K else F.zeros((1, 0))
        if pairs:
            s2_2t = np.stack([F.dot(X[i], X[j]) for i, j in pairs])[None]
            s2 = yield from P.reduce(ctx, s2_2t)
        else:
            s2 = F.zeros((1, 0))
    else:
        n = F.total(w)
        parts = []
        if K:
            parts.append(np.stack([F.dot(np.broadcast_to(w[g], X.shape), X) for g in range(G)]))
        if pairs:
            Q = yield from P.mul(ctx, np.stack([X[i] for i, _ in pairs]), np.stack([X[j] for _, j in pairs]))
            parts.append(np.stack([F.dot(np.broadcast_to(w[g], Q.shape), Q) for g in range(G)]))
        if parts:
            red = yield from P.reduce(ctx, np.concatenate(parts, axis=1))
            s1, s2 = red[:, :K], red[:, K:]
        else:
            s1, s2 = F.zeros((G, 0)), F.zeros((G, 0))
    if p.op == "count":
        return F.zeros((G, 0)), n
    if p.op in ("sum", "mean"):
        return s1, n
    if p.op == "linreg":
        return np.concatenate([s1, s2], axis=1), n
    # centred sums: n Σxy − Σx Σy for each pair, computed inside MPC
    nn = np.broadcast_to(n[:, None], s2.shape).copy()
    left = np.concatenate([nn, s1[:, [i for i, _ in pairs]]], axis=1)
    right = np.concatenate([s2, s1[:, [j for _, j in pairs]]], axis=1)
    prods = yield from P.mul(ctx, left, right)
    P2 = len(pairs)
    centred = F.sub(prods[:, :P2], prods[:, P2:])
    if p.op == "ttest":
        return np.concatenate([s1, centred], axis=1), n
    return centred, n


def _order(ctx: Context, p: Plan, schema: Any, w: F.Vec | None, data: Mapping[str, F.Vec],
           rows: int) -> Generator[Any, Any, tuple[F.Vec, F.Vec]]:
    """Per group: n and the two order statistics numpy's linear quantile interpolates (encoded units)."""
    col = _numeric(schema, p.variables[0])
    x = F.add_const(data[col.name], -col.lo)
    width = max(1, (col.hi - col.lo).bit_length())
    xbits = yield from P.bit_decompose(ctx, x, width)
    masks = w if w is not None else _ones(rows)[None]
    n = F.total(masks)
    q = p.quantiles[0]
    conditions = P.quantile_conditions(q.numerator, q.denominator)
    found = yield from P.order_statistics(ctx, xbits, masks, conditions)
    # (G, 2): the k1-th and k2-th smallest of each group, relative to lo
    vals = F.add_const(found, col.lo)
    return vals, n


def _histogram(ctx: Context, p: Plan, schema: Any, f: F.Vec | None, data: Mapping[str, F.Vec],
               rows: int) -> Generator[Any, Any, tuple[F.Vec, F.Vec]]:
    """Per bin: its count (the bins are the groups)."""
    col = _numeric(schema, p.variables[0])
    x = data[col.name]
    atoms = _Atoms()
    lows, highs = [], []
    for g in p.groups:
        assert g.bin is not None
        lo, hi, closed = g.bin
        lows.append(_lt_const(atoms, col, x, math.ceil(lo * col.scale)))
        highs.append(_lt_const(atoms, col, x, math.floor(hi * col.scale) + 1 if closed
                               else math.ceil(hi * col.scale)))
    bits = yield from P.ltz(ctx, np.stack(atoms.diffs), atoms.bits)
    inbin = np.stack([F.sub(bits[h], bits[lo_]) for lo_, h in zip(lows, highs, strict=True)])
    if f is None:
        n = F.total(inbin)
    else:
        n2t = np.stack([F.dot(inbin[g], f) for g in range(len(p.groups))])
        n = yield from P.reduce(ctx, n2t)
    return F.zeros((len(p.groups), 0)), n


def value_layout(p: Plan) -> Sequence[str]:
    """Names of a group's values after [ok, n] (for finish and for tests)."""
    if p.op in ("count", "histogram", "crosstab", "chi2"):
        return ()
    if p.op in ("sum", "mean"):
        return ("sx",)
    if p.op in ("var", "std"):
        return ("Sxx",)
    if p.op == "ttest":
        return ("sx", "Sxx")
    if p.op == "cov":
        return ("Sxy",)
    if p.op == "corr":
        return ("Sxx", "Syy", "Sxy")
    if p.op == "linreg":
        return tuple(f"s{i}" for i in range(len(p.variables))) + tuple(f"s{i}{j}" for i, j in p.pairs)
    return ("lo", "hi")
