"""Statistics queries: the Query model, its JSON form, and the filter and SQL parsers.

A :class:`Query` names one operation over one or more tables (their union,
rows appended; or one table equi-joined with another on an id column), a
filter (:data:`Expr`: comparisons of a column with a literal, AND, OR,
NOT) and up to two group-by columns. It holds no schema knowledge: whether
the columns exist and have suitable types is for :mod:`qstore.mpc.stats`.

Queries cross the node boundary as JSON (:meth:`Query.to_json`,
:meth:`Query.from_json`); the parser there is strict about keys, types and
sizes and raises only :class:`QueryError` (HTTP 400), as do
:func:`parse_where` and :func:`parse_sql`, which read text with sqlglot
(never by hand) and accept a small subset of SQL:

    SELECT sex, COUNT(*), AVG(weight) FROM patients WHERE age >= 40 GROUP BY sex

Tables: ``FROM t``; a union of same-schema tables as
``FROM (SELECT * FROM a UNION ALL SELECT * FROM b) AS u`` or, shorter,
``FROM UNION_ALL(a, b)`` (a qstore extension); an equi-join as
``FROM a JOIN b USING (id)`` or ``FROM a JOIN b ON a.id = b.id``.
Aggregates (one Query each): COUNT(*), COUNT(x), SUM, AVG/MEAN,
VAR_SAMP/VARIANCE, STDDEV/STDDEV_SAMP (sample statistics), MIN, MAX,
MEDIAN, QUANTILE(x, q), PERCENTILE_CONT(q) WITHIN GROUP (ORDER BY x),
COVAR_SAMP(x, y), CORR(x, y), and the extensions LINREG(y, x1, ...),
TTEST(x[, mu]), CHI2(a, b), CROSSTAB(a, b), HISTOGRAM(x[, edge, ...]).
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Any

import sqlglot
from sqlglot import exp

from qstore.errors import RemoteError
from qstore.tables import NAME_RE

OPS = ("count", "sum", "mean", "var", "std", "min", "max", "median", "quantile", "histogram", "crosstab",
       "cov", "corr", "linreg", "ttest", "chi2")
COMPARE_OPS = ("=", "!=", "<", "<=", ">", ">=")
MAX_DEPTH = 32          # nesting of a filter expression
MAX_NODES = 256         # nodes of a filter expression
MAX_STRING = 256        # characters of a string literal
MAX_TABLES = 16
MAX_GROUP_BY = 2
MAX_COLUMNS = 16        # linreg: y and up to 15 regressors
MAX_EDGES = 257         # histogram: up to 256 bins
MAX_DIGITS = 40         # of a numeric literal (and |exponent| ≤ 40)
MAX_TEXT = 65536        # characters of a filter or SQL statement
MAX_AGGREGATES = 32     # per SQL statement

_ARITY = {"count": (0, 1), "linreg": (2, MAX_COLUMNS), "cov": (2, 2), "corr": (2, 2), "crosstab": (2, 2),
          "chi2": (2, 2)}
_FLIP = {"=": "=", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)


class QueryError(RemoteError):
    """A query, filter or SQL statement qstore cannot run; the message names what is wrong."""


# ------------------------------------------------------------------ values


def _name(value: object, what: str = "column") -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise QueryError(f"{what} name {repr(value)[:80]} must match [A-Za-z_][A-Za-z0-9_]{{0,62}}")
    return value


def _names(value: object, what: str, item: str, lo: int, hi: int) -> tuple[str, ...]:
    if isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, tuple) or not lo <= len(value) <= hi:
        raise QueryError(f"{what} must be a list of {f'at most {hi}' if lo == 0 else f'{lo} to {hi}'} names")
    out = tuple(_name(v, item) for v in value)
    if len(set(out)) != len(out):
        raise QueryError(f"{what} names the same {item} twice")
    return out


def _decimal(value: object, what: str) -> Decimal:
    """An exact number of bounded size: Decimal or int (bools and floats are refused)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if len(str(abs(value))) > MAX_DIGITS:
            raise QueryError(f"{what} has more than {MAX_DIGITS} digits")
        return Decimal(value)
    if not isinstance(value, Decimal):
        raise QueryError(f"{what} must be an exact number (int or Decimal), not {type(value).__name__}")
    if not value.is_finite():
        raise QueryError(f"{what} must be finite")
    t = value.as_tuple()
    if len(t.digits) > MAX_DIGITS or not -MAX_DIGITS <= int(t.exponent) <= MAX_DIGITS:
        raise QueryError(f"{what} has more than {MAX_DIGITS} digits or too large an exponent")
    return value


def _number_text(text: str, what: str) -> int | Decimal:
    """A numeric literal's text → int (plain digits) or Decimal, exactly."""
    if len(text) > 2 * MAX_DIGITS + 8 or not _NUMBER.fullmatch(text):
        raise QueryError(f"{what}: {text[:40]!r} is not a number")
    if text.lstrip("+-").isdigit():
        v = int(text)
        _decimal(v, what)
        return v
    return _decimal(Decimal(text), what)


def _literal_value(value: object) -> str | int | Decimal | bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise QueryError(f"a string literal has at most {MAX_STRING} characters")
        return value
    if isinstance(value, int):
        _decimal(value, "a number")
        return value
    if isinstance(value, Decimal):
        return _decimal(value, "a number")
    kind = type(value).__name__
    raise QueryError(f"a literal must be a string, an integer, a Decimal or a boolean, not {kind}")


# ------------------------------------------------------------------ expressions


@dataclass(frozen=True)
class Compare:
    """``column op value``: a secret column against a public literal."""

    column: str
    op: str
    value: str | int | Decimal | bool
    depth: int = field(default=1, init=False, repr=False, compare=False)
    size: int = field(default=1, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _name(self.column)
        if self.op not in COMPARE_OPS:
            raise QueryError(f"comparison must be one of {' '.join(COMPARE_OPS)}, not {str(self.op)[:20]!r}")
        _literal_value(self.value)
        if isinstance(self.value, str | bool) and self.op not in ("=", "!="):
            kind = "booleans" if isinstance(self.value, bool) else "strings"
            raise QueryError(f"{self.column} {self.op} …: {kind} compare with = or != only")


def _children_checked(items: tuple[Any, ...], what: str) -> tuple[int, int]:
    for i in items:
        if not isinstance(i, Compare | And | Or | Not):
            raise QueryError(f"{what} takes filter expressions, not {type(i).__name__}")
    depth = 1 + max(i.depth for i in items)
    size = 1 + sum(i.size for i in items)
    if depth > MAX_DEPTH:
        raise QueryError(f"a filter nests at most {MAX_DEPTH} deep")
    if size > MAX_NODES:
        raise QueryError(f"a filter has at most {MAX_NODES} comparisons and operators")
    return depth, size


@dataclass(frozen=True)
class And:
    """All of ``items`` (at least two)."""

    items: tuple[Expr, ...]
    depth: int = field(default=0, init=False, repr=False, compare=False)
    size: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _init_junction(self, "AND")


@dataclass(frozen=True)
class Or:
    """Any of ``items`` (at least two)."""

    items: tuple[Expr, ...]
    depth: int = field(default=0, init=False, repr=False, compare=False)
    size: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _init_junction(self, "OR")


def _init_junction(node: And | Or, what: str) -> None:
    items = node.items
    if isinstance(items, list):
        items = tuple(items)
        object.__setattr__(node, "items", items)
    if not isinstance(items, tuple) or not 2 <= len(items) <= MAX_NODES:
        raise QueryError(f"{what} takes a list of 2 to {MAX_NODES} expressions")
    depth, size = _children_checked(items, what)
    object.__setattr__(node, "depth", depth)
    object.__setattr__(node, "size", size)


@dataclass(frozen=True)
class Not:
    """The negation of ``item``."""

    item: Expr
    depth: int = field(default=0, init=False, repr=False, compare=False)
    size: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        depth, size = _children_checked((self.item,), "NOT")
        object.__setattr__(self, "depth", depth)
        object.__setattr__(self, "size", size)


Expr = Compare | And | Or | Not


def expr_columns(expr: Expr | None) -> list[str]:
    """The columns a filter reads, each once, in order of first use."""
    out: dict[str, None] = {}
    stack = [] if expr is None else [expr]
    while stack:
        e = stack.pop()
        if isinstance(e, Compare):
            out.setdefault(e.column)
        elif isinstance(e, Not):
            stack.append(e.item)
        else:
            stack.extend(reversed(e.items))
    return list(out)


# ------------------------------------------------------------------ query


@dataclass(frozen=True, kw_only=True)
class Join:
    """An inner equi-join with ``table`` on the id column ``on`` (same name in both tables)."""

    table: str
    on: str

    def __post_init__(self) -> None:
        _name(self.table, "table")
        _name(self.on, "join column")


@dataclass(frozen=True, kw_only=True)
class Query:
    """One statistic over the union of ``tables`` (joined with ``join.table``); valid by construction.

    ``q`` (quantile only) is a Fraction in [0, 1]; ``bins`` (histogram only)
    are ascending Decimal edges, None for the default bins; ``mu``
    (ttest only) makes the test one-sample, else the test is Welch's between
    the two groups of its single group-by column. ints are accepted for
    q, bins and mu, and lists for the tuples.
    """

    op: str
    tables: tuple[str, ...]
    columns: tuple[str, ...] = ()
    where: Expr | None = None
    group_by: tuple[str, ...] = ()
    q: Fraction | None = None
    bins: tuple[Decimal, ...] | None = None
    mu: Decimal | None = None
    join: Join | None = None

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise QueryError(f"unknown operation {str(self.op)[:40]!r} (one of {', '.join(OPS)})")
        op = self.op
        object.__setattr__(self, "tables", _names(self.tables, "tables", "table", 1, MAX_TABLES))
        lo, hi = _ARITY.get(op, (1, 1))
        cols = self.columns
        if not isinstance(cols, list | tuple) or not lo <= len(cols) <= hi:
            want = f"{lo}" if lo == hi else f"{lo} or {hi}" if hi == lo + 1 else f"{lo} to {hi}"
            got = len(cols) if isinstance(cols, list | tuple) else "no list"
            raise QueryError(f"{op} takes {want} column{'s' if hi != 1 else ''}, got {got}")
        object.__setattr__(self, "columns", tuple(_name(c) for c in cols))
        group_by = _names(self.group_by, "group_by", "group-by column", 0, MAX_GROUP_BY)
        object.__setattr__(self, "group_by", group_by)
        if self.where is not None and not isinstance(self.where, Compare | And | Or | Not):
            raise QueryError("where must be a filter expression or None")
        if self.join is not None:
            if not isinstance(self.join, Join):
                raise QueryError("join must be a Join or None")
            if self.join.table in self.tables:
                raise QueryError(f"table {self.join.table!r} cannot be joined with itself")
        self._check_parameters()

    def _check_parameters(self) -> None:
        op = self.op
        for key, owner in (("q", "quantile"), ("bins", "histogram"), ("mu", "ttest")):
            if getattr(self, key) is not None and op != owner:
                raise QueryError(f"{key} applies to {owner} only, not {op}")
        if op == "quantile":
            q = self.q
            if q is None:
                raise QueryError("quantile needs q (a number in [0, 1])")
            if isinstance(q, int | Decimal) and not isinstance(q, bool):
                q = Fraction(_decimal(q, "q"))
            if not isinstance(q, Fraction):
                raise QueryError(f"q must be a Fraction, not {type(q).__name__}")
            if not 0 <= q <= 1:
                raise QueryError("q must be in [0, 1]")
            if q.denominator.bit_length() > 136:
                raise QueryError("q has too large a denominator")
            object.__setattr__(self, "q", q)
        if self.bins is not None:
            bins = self.bins
            if not isinstance(bins, list | tuple) or not 2 <= len(bins) <= MAX_EDGES:
                raise QueryError(f"bins must be a list of 2 to {MAX_EDGES} edges")
            edges = tuple(_decimal(b, "a bin edge") for b in bins)
            if any(a >= b for a, b in itertools.pairwise(edges)):
                raise QueryError("bin edges must be strictly ascending")
            object.__setattr__(self, "bins", edges)
        if self.mu is not None:
            object.__setattr__(self, "mu", _decimal(self.mu, "mu"))
        if op == "ttest" and self.mu is None and len(self.group_by) != 1:
            raise QueryError("ttest needs mu (one-sample test) or one group-by column of two values (Welch)")

    # ------------------------------------------------------------ JSON

    def to_json(self) -> dict[str, Any]:
        """Plain JSON: numbers exact as strings (q as "n/d"), the filter as nested objects."""
        return {
            "op": self.op,
            "tables": list(self.tables),
            "columns": list(self.columns),
            "where": None if self.where is None else expr_to_json(self.where),
            "group_by": list(self.group_by),
            "q": None if self.q is None else str(self.q),
            "bins": None if self.bins is None else [str(b) for b in self.bins],
            "mu": None if self.mu is None else str(self.mu),
            "join": None if self.join is None else {"table": self.join.table, "on": self.join.on},
        }

    @classmethod
    def from_json(cls, obj: object) -> Query:
        """The inverse of :meth:`to_json`, strict; absent optional keys take their defaults."""
        if not isinstance(obj, Mapping):
            raise QueryError("a query must be a JSON object")
        unknown = set(obj) - _QUERY_KEYS
        if unknown:
            raise QueryError(f"unknown query key {sorted(map(str, unknown))[0]!r}")
        for key in ("op", "tables"):
            if key not in obj:
                raise QueryError(f"a query needs {key!r}")
        if not isinstance(obj["op"], str):
            raise QueryError("op must be a string")
        args: dict[str, Any] = {"op": obj["op"]}
        for key in ("tables", "columns", "group_by"):
            v = obj.get(key, [])
            if not isinstance(v, list):
                raise QueryError(f"{key} must be a list")
            args[key] = tuple(v)
        if obj.get("where") is not None:
            args["where"] = expr_from_json(obj["where"])
        if obj.get("q") is not None:
            args["q"] = _fraction_json(obj["q"])
        if obj.get("bins") is not None:
            bins = obj["bins"]
            if not isinstance(bins, list) or len(bins) > MAX_EDGES:
                raise QueryError(f"bins must be a list of at most {MAX_EDGES} decimal strings")
            args["bins"] = tuple(_decimal_json(b, "a bin edge") for b in bins)
        if obj.get("mu") is not None:
            args["mu"] = _decimal_json(obj["mu"], "mu")
        if obj.get("join") is not None:
            j = obj["join"]
            if not isinstance(j, Mapping) or set(j) != {"table", "on"}:
                raise QueryError('join must be {"table": name, "on": column}')
            args["join"] = Join(table=_name(j["table"], "table"), on=_name(j["on"], "join column"))
        return cls(**args)


_QUERY_KEYS = frozenset({"op", "tables", "columns", "where", "group_by", "q", "bins", "mu", "join"})


def _decimal_json(v: object, what: str) -> Decimal:
    if isinstance(v, int) and not isinstance(v, bool):
        return _decimal(v, what)
    if not isinstance(v, str):
        raise QueryError(f"{what} must be a decimal string")
    n = _number_text(v, what)
    return n if isinstance(n, Decimal) else Decimal(n)


def _fraction_json(v: object) -> Fraction:
    if not isinstance(v, str) or len(v) > 2 * MAX_DIGITS + 1:
        raise QueryError('q must be a string "n/d" or a decimal')
    num, slash, den = v.partition("/")
    if slash:
        if not num.isascii() or not den.isascii() or not num.isdigit() or not den.isdigit() or int(den) == 0:
            raise QueryError('q must be a string "n/d" or a decimal')
        return Fraction(int(num), int(den))
    return Fraction(_decimal_json(v, "q"))


def expr_to_json(expr: Expr) -> dict[str, Any]:
    """``{"column", "op", "value"}`` / ``{"and": [...]}`` / ``{"or": [...]}`` / ``{"not": {...}}``.

    A Decimal value is ``{"decimal": "1.5"}`` (strings, ints and booleans are plain JSON).
    """
    if isinstance(expr, Compare):
        v = expr.value
        return {"column": expr.column, "op": expr.op,
                "value": {"decimal": str(v)} if isinstance(v, Decimal) else v}
    if isinstance(expr, Not):
        return {"not": expr_to_json(expr.item)}
    key = "and" if isinstance(expr, And) else "or"
    return {key: [expr_to_json(i) for i in expr.items]}


def expr_from_json(obj: object) -> Expr:
    """The inverse of :func:`expr_to_json`, bounded in depth and size before anything is built."""
    budget = [MAX_NODES]
    return _expr_json(obj, 1, budget)


def _expr_json(obj: object, depth: int, budget: list[int]) -> Expr:
    if depth > MAX_DEPTH:
        raise QueryError(f"a filter nests at most {MAX_DEPTH} deep")
    budget[0] -= 1
    if budget[0] < 0:
        raise QueryError(f"a filter has at most {MAX_NODES} comparisons and operators")
    if not isinstance(obj, Mapping):
        raise QueryError("a filter node must be a JSON object")
    keys = set(obj)
    if keys == {"column", "op", "value"}:
        v = obj["value"]
        if isinstance(v, Mapping):
            if set(v) != {"decimal"}:
                raise QueryError('a decimal value must be {"decimal": "1.5"}')
            v = _decimal_json(v["decimal"], "a decimal value")
            if not isinstance(v, Decimal):
                v = Decimal(v)
        elif not isinstance(v, str | int):  # bool is an int
            raise QueryError('a comparison value is a string, an integer, a boolean or {"decimal": ...}')
        if not isinstance(obj["op"], str):
            raise QueryError("op must be a string")
        return Compare(column=_name(obj["column"]), op=obj["op"], value=v)
    if keys == {"not"}:
        return Not(_expr_json(obj["not"], depth + 1, budget))
    if keys in ({"and"}, {"or"}):
        (key,) = keys
        items = obj[key]
        if not isinstance(items, list) or not 2 <= len(items) <= MAX_NODES:
            raise QueryError(f"{key} takes a list of 2 to {MAX_NODES} expressions")
        parts = tuple(_expr_json(i, depth + 1, budget) for i in items)
        return And(parts) if key == "and" else Or(parts)
    raise QueryError("a filter node is {column, op, value}, {and: [...]}, {or: [...]} or {not: ...}")


# ------------------------------------------------------------------ text


@functools.lru_cache(maxsize=1024)
def _plain_identifier(name: str) -> bool:
    """Whether sqlglot reads ``name`` unquoted as a column (not a keyword, function or literal)."""
    try:
        e = sqlglot.condition(f"{name} = 1")
    except Exception:  # any failure means: quote it
        return False
    col = e.this if isinstance(e, exp.EQ) else None
    return isinstance(col, exp.Column) and col.name == name and not col.table


def _ident(name: str) -> str:
    return name if _plain_identifier(name) else f'"{name}"'


def _literal_sql(v: str | int | Decimal | bool) -> str:
    if isinstance(v, bool):
        return "TRUE" if v else "FALSE"
    if isinstance(v, str):
        return "'" + v.replace("'", "''") + "'"
    return str(v)


def format_where(expr: Expr) -> str:
    """A filter as SQL text that :func:`parse_where` reads back to the same expression."""
    if isinstance(expr, Compare):
        return f"{_ident(expr.column)} {expr.op} {_literal_sql(expr.value)}"
    if isinstance(expr, Not):
        return f"NOT ({format_where(expr.item)})"
    word = " AND " if isinstance(expr, And) else " OR "
    return word.join(format_where(i) if isinstance(i, Compare) else f"({format_where(i)})"
                     for i in expr.items)


def _fraction_label(v: Fraction) -> str:
    """A decimal if ``v`` has a finite one (0.25), else n/d (1/3); exact either way."""
    d, twos, fives = v.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    if d != 1:
        return str(v)
    k = max(twos, fives)
    return format(Decimal(f"{v.numerator * (10**k // v.denominator)}e-{k}"), "f")


def describe(query: Query, *, tables: bool = False) -> str:
    """A short label: ``mean(weight) where sex = 'M' by sex`` (``tables=True`` adds ``from ...``)."""
    args = list(query.columns) or ["*"]
    if query.q is not None:
        args.append(f"q={_fraction_label(query.q)}")
    if query.mu is not None:
        args.append(f"mu={query.mu}")
    if query.bins is not None:
        args.append("bins=[" + ", ".join(map(str, query.bins)) + "]")
    out = f"{query.op}({', '.join(args)})"
    if tables:
        names = query.tables[0] if len(query.tables) == 1 else f"union_all({', '.join(query.tables)})"
        out += f" from {names}"
        if query.join is not None:
            out += f" join {query.join.table} using ({query.join.on})"
    if query.where is not None:
        out += f" where {format_where(query.where)}"
    if query.group_by:
        out += f" by {', '.join(query.group_by)}"
    return out


# ------------------------------------------------------------------ sqlglot → Expr


def _sql(node: exp.Expression) -> str:
    try:
        text = node.sql()
    except Exception:  # sqlglot cannot print every tree it parses
        text = type(node).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_failure(what: str, e: Exception) -> QueryError:
    errors = getattr(e, "errors", None)
    if errors and isinstance(errors[0], dict):
        first = errors[0]
        where = f" (line {first.get('line')}, column {first.get('col')})" if first.get("line") else ""
        description = re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", str(first.get("description")))
        return QueryError(f"cannot parse the {what}: {description}{where}")
    if isinstance(e, RecursionError):
        return QueryError(f"cannot parse the {what}: nested too deeply")
    reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
    return QueryError(f"cannot parse the {what}: {reason}")


def _check_text(text: object, what: str) -> str:
    if not isinstance(text, str):
        raise QueryError(f"the {what} must be text")
    if len(text) > MAX_TEXT:
        raise QueryError(f"the {what} has more than {MAX_TEXT} characters")
    if not text.strip():
        raise QueryError(f"the {what} is empty")
    return text


class _Scope:
    """Which qualifiers (``t.x``) a statement allows: table names and aliases in FROM."""

    def __init__(self, qualifiers: set[str] | None = None):
        self.qualifiers = qualifiers or set()

    def column(self, node: exp.Expression, what: str = "a column") -> str:
        if not isinstance(node, exp.Column) or not isinstance(node.this, exp.Identifier):
            raise QueryError(f"expected {what} name, not {_sql(node)!r}")
        if node.args.get("db") or node.args.get("catalog"):
            raise QueryError(f"column {_sql(node)!r}: at most one qualifier (table.column)")
        table = node.args.get("table")
        if table is not None:
            if not self.qualifiers:
                raise QueryError(f"column {_sql(node)!r}: qualified names only refer to tables in SQL FROM")
            if table.name not in self.qualifiers:
                raise QueryError(f"column {_sql(node)!r}: {table.name!r} is not a table in FROM")
        return _name(node.name)


def _literal(node: exp.Expression) -> str | int | Decimal | bool:
    sign = 1
    while True:
        if isinstance(node, exp.Paren):
            node = node.this
        elif isinstance(node, exp.Neg):
            sign, node = -sign, node.this
        else:
            break
    if isinstance(node, exp.Literal):
        if node.is_string:
            if sign < 0:
                raise QueryError("a string cannot be negated")
            return _literal_value(node.this)
        v = _number_text(node.this, "a number")
        if sign > 0:
            return v
        return v.copy_negate() if isinstance(v, Decimal) else -v  # exact: no context rounding
    if isinstance(node, exp.Boolean) and sign > 0:
        return bool(node.this)
    if isinstance(node, exp.Null):
        raise QueryError("NULL is not supported: tables have no missing values")
    raise QueryError(f"expected a literal (number, 'string', TRUE or FALSE), not {_sql(node)!r}")


def _is_literal(node: exp.Expression) -> bool:
    while isinstance(node, exp.Paren | exp.Neg):
        node = node.this
    return isinstance(node, exp.Literal | exp.Boolean | exp.Null)


_COMPARISONS: dict[type, str] = {exp.EQ: "=", exp.NEQ: "!=", exp.LT: "<", exp.LTE: "<=", exp.GT: ">",
                                 exp.GTE: ">="}


def _junction_items(node: exp.Expression, kind: type) -> Iterator[exp.Expression]:
    """Operands of an unparenthesised chain ``a AND b AND c`` (sqlglot nests it to the left)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if type(n) is kind:
            stack += [n.expression, n.this]
        else:
            yield n


def _condition(node: exp.Expression, scope: _Scope, depth: int = 1) -> Expr:
    if depth > MAX_DEPTH:
        raise QueryError(f"a filter nests at most {MAX_DEPTH} deep")
    if isinstance(node, exp.Paren):
        return _condition(node.this, scope, depth)
    if type(node) in (exp.And, exp.Or):
        items = tuple(_condition(i, scope, depth + 1) for i in _junction_items(node, type(node)))
        if len(items) > MAX_NODES:
            raise QueryError(f"a filter has at most {MAX_NODES} comparisons and operators")
        return And(items) if isinstance(node, exp.And) else Or(items)
    if isinstance(node, exp.Not):
        return Not(_condition(node.this, scope, depth + 1))
    op = _COMPARISONS.get(type(node))
    if op is not None:
        left, right = node.this, node.expression
        if _is_literal(left) and not _is_literal(right):
            left, right, op = right, left, _FLIP[op]
        if isinstance(right, exp.Column) and isinstance(left, exp.Column):
            hint = "; strings take single quotes" if right.this.args.get("quoted") else ""
            raise QueryError(f"{_sql(node)!r} compares two columns: one side must be a literal{hint}")
        if not isinstance(left, exp.Column):
            raise QueryError(f"{_sql(node)!r}: one side of a comparison must be a column name")
        return Compare(scope.column(left), op, _literal(right))
    if isinstance(node, exp.Between):
        if node.args.get("symmetric"):
            raise QueryError("BETWEEN SYMMETRIC is not supported")
        col = scope.column(node.this, "a column before BETWEEN")
        low, high = _literal(node.args["low"]), _literal(node.args["high"])
        return And((Compare(col, ">=", low), Compare(col, "<=", high)))
    if isinstance(node, exp.In):
        if any(node.args.get(k) for k in ("query", "unnest", "field")):
            raise QueryError(f"IN takes a list of literals: {_sql(node)!r}")
        col = scope.column(node.this, "a column before IN")
        values = node.expressions
        if not values or len(values) > MAX_NODES - 1:
            raise QueryError(f"IN takes 1 to {MAX_NODES - 1} literals")
        items = tuple(Compare(col, "=", _literal(v)) for v in values)
        return items[0] if len(items) == 1 else Or(items)
    if isinstance(node, exp.Column):
        return Compare(scope.column(node), "=", True)  # a bare boolean column
    if isinstance(node, exp.Boolean):
        raise QueryError("a constant TRUE or FALSE is not a filter")
    raise QueryError(f"not supported in a filter: {_sql(node)!r} ({type(node).__name__})")


def parse_where(text: str) -> Expr:
    """A filter such as ``sex = 'M' AND age BETWEEN 40 AND 60``, parsed by sqlglot.

    ``=``/``==``, ``!=``/``<>``, ``<``, ``<=``, ``>``, ``>=`` between a column
    and a literal (either side: ``5 < age`` is ``age > 5``), AND, OR, NOT,
    parentheses, ``BETWEEN a AND b`` (both ends included), ``IN (...)``, a
    bare column (``smoker`` means ``smoker = TRUE``). Numbers stay exact
    (int or Decimal); strings take single quotes.
    """
    _check_text(text, "filter")
    try:
        node = sqlglot.condition(text)
    except Exception as e:  # sqlglot's errors, RecursionError, anything it raises on garbage
        raise _parse_failure("filter", e) from None
    if isinstance(node, exp.Block):
        raise QueryError("a filter is one expression (remove the ';')")
    try:
        return _condition(node, _Scope())
    except RecursionError:
        raise QueryError("the filter is nested too deeply") from None


# ------------------------------------------------------------------ SQL


# sqlglot argument names → the SQL words an error message shows (others: the name in capitals).
_SQL_WORDS = {
    "distinct": "DISTINCT", "order": "ORDER BY", "having": "HAVING", "with_": "WITH", "windows": "WINDOW",
    "locks": "FOR UPDATE", "sample": "TABLESAMPLE", "kind": "SELECT AS", "hint": "hints",
    "connect": "CONNECT BY", "sort": "SORT BY", "cluster": "CLUSTER BY", "distribute": "DISTRIBUTE BY",
    "pivots": "PIVOT", "match": "MATCH_RECOGNIZE", "options": "OPTION", "operation_modifiers": "modifiers",
    "for_": "FOR", "by_name": "BY NAME", "side": "a side", "joins": "JOIN", "group": "GROUP BY",
    "expressions": "columns", "from_": "FROM", "alias": "an alias", "db": "a database",
    "catalog": "a catalog", "method": "NATURAL", "global_": "GLOBAL", "grouping_sets": "GROUPING SETS",
    "totals": "WITH TOTALS",
}


def _only(node: exp.Expression, allowed: set[str], where: str) -> None:
    """Refuse any argument of ``node`` outside ``allowed``, naming the SQL construct."""
    for key, value in node.args.items():
        if key in allowed or value is None or value is False or value == []:
            continue
        raise QueryError(f"{_SQL_WORDS.get(key, key.upper())} is not supported {where}")


_UNION_FORM = "(SELECT * FROM a UNION ALL SELECT * FROM b) AS u"
_UNION_HINT = "to query several tables write FROM UNION_ALL(a, b) or FROM " + _UNION_FORM
_UNION_PART = "each part of a union is SELECT * FROM table"


@dataclass
class _From:
    tables: tuple[str, ...]
    scope: _Scope
    join: Join | None = None


def _table(node: exp.Expression, scope: _Scope) -> str:
    if not isinstance(node, exp.Table) or not isinstance(node.this, exp.Identifier):
        raise QueryError(f"expected a table name, not {_sql(node)!r}")
    _only(node, {"this", "alias"}, "on a table in FROM")
    alias = node.args.get("alias")
    name = _name(node.name, "table")
    scope.qualifiers.add(name)
    if alias is not None:
        if alias.args.get("columns"):
            raise QueryError("column aliases of a table are not supported")
        scope.qualifiers.add(alias.name)
    return name


def _union_tables(node: exp.Expression) -> list[str]:
    """Tables of ``SELECT * FROM a UNION ALL SELECT * FROM b ...`` (nested to the left)."""
    if isinstance(node, exp.Union):
        _only(node, {"this", "expression", "distinct"}, "in a union")
        if node.args.get("distinct") is not False:
            raise QueryError("UNION removes duplicate rows: write UNION ALL")
        return _union_tables(node.this) + _union_tables(node.expression)
    if isinstance(node, exp.Subquery):  # (SELECT * FROM a) UNION ALL ...
        _only(node, {"this"}, "in a union")
        return _union_tables(node.this)
    if not isinstance(node, exp.Select):
        raise QueryError(f"{_UNION_PART}, not {_sql(node)!r}")
    _only(node, {"expressions", "from", "from_"}, "inside a union (only SELECT * FROM table)")
    items = node.expressions
    if len(items) != 1 or not isinstance(items[0], exp.Star) or any(items[0].args.values()):
        raise QueryError(_UNION_PART)
    frm = node.args.get("from_") or node.args.get("from")
    if frm is None:
        raise QueryError(_UNION_PART)
    _only(frm, {"this"}, "inside a union")
    return [_table(frm.this, _Scope())]


def _from(select: exp.Select) -> _From:
    frm = select.args.get("from_") or select.args.get("from")
    if frm is None:
        raise QueryError("FROM is missing")
    _only(frm, {"this"}, "in FROM")
    src, scope = frm.this, _Scope()
    usage = "FROM takes a table, UNION_ALL(a, b, ...) or " + _UNION_FORM
    if isinstance(src, exp.Table) and isinstance(src.this, exp.Anonymous):
        if src.this.name.upper() != "UNION_ALL":
            raise QueryError(f"{usage}, not the function {src.this.name}")
        _only(src, {"this", "alias"}, "on UNION_ALL(...)")
        tables = tuple(_Scope().column(a, "a table") for a in src.this.expressions)
        if src.args.get("alias") is not None:
            scope.qualifiers.add(src.args["alias"].name)
    elif isinstance(src, exp.Table):
        tables = (_table(src, scope),)
    elif isinstance(src, exp.Subquery):
        _only(src, {"this", "alias"}, "on a subquery in FROM")
        alias = src.args.get("alias")
        if alias is not None:
            if alias.args.get("columns"):
                raise QueryError("column aliases of a union are not supported")
            scope.qualifiers.add(alias.name)
        tables = tuple(_union_tables(src.this))
    else:
        raise QueryError(usage)
    if not tables:
        raise QueryError("UNION_ALL() names no table")
    if len(tables) > MAX_TABLES:
        raise QueryError(f"a query reads at most {MAX_TABLES} tables")
    out = _From(tables=tables, scope=scope)
    joins = select.args.get("joins") or []
    if len(joins) > 1:
        raise QueryError("at most one JOIN")
    if joins:
        out.join = _join(joins[0], scope)
    return out


def _join(node: exp.Join, left: _Scope) -> Join:
    kind = node.args.get("kind")
    if node.args.get("side") or node.args.get("method") or (kind and str(kind).upper() != "INNER"):
        words = " ".join(str(node.args[k]) for k in ("method", "side", "kind") if node.args.get(k))
        raise QueryError(f"{words} JOIN is not supported: only an inner equi-join (JOIN ... USING (id))")
    if not node.args.get("on") and not node.args.get("using"):
        raise QueryError("FROM a, b and JOIN without USING or ON are cross joins (not supported): "
                         "for a union write UNION_ALL(a, b), for a join JOIN b USING (id)")
    _only(node, {"this", "on", "using", "kind"}, "on a JOIN")
    right = _Scope()
    table = _table(node.this, right)
    using, on = node.args.get("using"), node.args.get("on")
    if using:
        if len(using) != 1:
            raise QueryError("JOIN USING takes exactly one column")
        col = using[0]
        name = col.name if isinstance(col, exp.Identifier | exp.Column) else ""
        left.qualifiers |= right.qualifiers
        return Join(table=table, on=_name(name, "join column"))
    if not isinstance(on, exp.EQ) or not all(isinstance(c, exp.Column) for c in (on.this, on.expression)):
        raise QueryError(f"JOIN ON takes one equality of columns (a.id = b.id), not {_sql(on)!r}")
    sides = []
    for c in (on.this, on.expression):
        q = c.args.get("table")
        if q is None:
            raise QueryError("qualify the columns of JOIN ON with their tables: ON a.id = b.id")
        if q.name in right.qualifiers and q.name not in left.qualifiers:
            sides.append("right")
        elif q.name in left.qualifiers and q.name not in right.qualifiers:
            sides.append("left")
        else:
            raise QueryError(f"JOIN ON: {q.name!r} is not one of the two joined tables")
    if sorted(sides) != ["left", "right"]:
        raise QueryError("JOIN ON compares a column of each table")
    if on.this.name != on.expression.name:
        raise QueryError("the join column must have the same name in both tables (JOIN ... USING (column))")
    left.qualifiers |= right.qualifiers
    return Join(table=table, on=_name(on.this.name, "join column"))


# Aggregates by SQL name: (op, number of column arguments (lo, hi), kind of the extra literal arguments).
_AGGREGATES: dict[str, tuple[str, tuple[int, int], str]] = {
    "COUNT": ("count", (0, 1), ""),
    "SUM": ("sum", (1, 1), ""),
    "AVG": ("mean", (1, 1), ""), "MEAN": ("mean", (1, 1), ""),
    "VAR_SAMP": ("var", (1, 1), ""), "VARIANCE": ("var", (1, 1), ""), "VARIANCE_SAMP": ("var", (1, 1), ""),
    "STDDEV": ("std", (1, 1), ""), "STDDEV_SAMP": ("std", (1, 1), ""),
    "MIN": ("min", (1, 1), ""), "MAX": ("max", (1, 1), ""),
    "MEDIAN": ("median", (1, 1), ""),
    "QUANTILE": ("quantile", (1, 1), "q"),
    "COVAR_SAMP": ("cov", (2, 2), ""), "CORR": ("corr", (2, 2), ""),
    "LINREG": ("linreg", (2, MAX_COLUMNS), ""),
    "TTEST": ("ttest", (1, 1), "mu"),
    "CHI2": ("chi2", (2, 2), ""), "CROSSTAB": ("crosstab", (2, 2), ""),
    "HISTOGRAM": ("histogram", (1, 1), "bins"),
}
# sqlglot's typed nodes for the standard functions, by class name (stable across its versions).
_TYPED = {
    "Count": "COUNT", "Sum": "SUM", "Avg": "AVG", "Variance": "VAR_SAMP", "VarianceSamp": "VAR_SAMP",
    "VariancePop": "VAR_POP", "Stddev": "STDDEV", "StddevSamp": "STDDEV_SAMP", "StddevPop": "STDDEV_POP",
    "Min": "MIN", "Max": "MAX", "Median": "MEDIAN", "Quantile": "QUANTILE", "CovarSamp": "COVAR_SAMP",
    "CovarPop": "COVAR_POP", "Corr": "CORR",
}
_POPULATION = {"VAR_POP": "VAR_SAMP", "VARIANCE_POP": "VAR_SAMP", "STDDEV_POP": "STDDEV_SAMP",
               "COVAR_POP": "COVAR_SAMP"}


def _func_args(node: exp.Func) -> list[exp.Expression]:
    if isinstance(node, exp.Anonymous):
        return list(node.expressions)
    out: list[exp.Expression] = []
    for key in node.arg_types:
        v = node.args.get(key)
        if isinstance(v, exp.Expression):
            out.append(v)
        elif isinstance(v, list):
            out += [x for x in v if isinstance(x, exp.Expression)]
    return out


def _func_name(node: exp.Expression) -> str:
    if isinstance(node, exp.Anonymous):
        return str(node.name).upper()
    typed = _TYPED.get(type(node).__name__)
    if typed:
        return typed
    try:
        return str(node.sql_name())
    except Exception:  # not every node has one
        return type(node).__name__.upper()


def _aggregate(node: exp.Expression, scope: _Scope) -> dict[str, Any]:
    """One SELECT item that is an aggregate → the Query arguments it sets."""
    if isinstance(node, exp.Window):
        raise QueryError(f"window functions (OVER) are not supported: {_sql(node)!r}")
    if isinstance(node, exp.Filter):
        raise QueryError("FILTER (WHERE ...) is not supported: use WHERE")
    if isinstance(node, exp.WithinGroup):
        return _percentile(node, scope)
    if not isinstance(node, exp.Func):
        raise QueryError(f"not supported in SELECT: {_sql(node)!r} (name group-by columns and aggregates)")
    name = _func_name(node)
    if name in _POPULATION:
        raise QueryError(f"{name} (population statistic) is not supported: use {_POPULATION[name]}")
    if name not in _AGGREGATES:
        raise QueryError(f"{name} is not a supported aggregate (supported: {', '.join(sorted(_AGGREGATES))}, "
                         "PERCENTILE_CONT)")
    op, (lo, hi), extra = _AGGREGATES[name]
    args = _func_args(node)
    if any(isinstance(a, exp.Distinct) for a in args):
        raise QueryError(f"DISTINCT is not supported in {name}")
    if op == "count" and len(args) == 1 and isinstance(args[0], exp.Star):
        if any(args[0].args.values()):
            raise QueryError(f"not supported: {_sql(node)!r}")
        return {"op": "count", "columns": ()}
    ncols = len(args)
    while ncols > 0 and extra and _is_literal(args[ncols - 1]):
        ncols -= 1
    cols = [_aggregate_column(a, name, node, scope) for a in args[:ncols]]
    literals = [_literal(a) for a in args[ncols:]]
    if not lo <= len(cols) <= hi:
        want = f"{lo}" if lo == hi else f"{lo} to {hi}"
        raise QueryError(f"{name} takes {want} column{'s' if hi != 1 else ''}: {_sql(node)!r}")
    out: dict[str, Any] = {"op": op, "columns": tuple(cols)}
    if extra == "q":
        if len(literals) != 1:
            raise QueryError(f"QUANTILE takes a column and a quantile: QUANTILE(x, 0.9), not {_sql(node)!r}")
        out["q"] = _quantile(literals[0])
    elif extra == "mu" and literals:
        if len(literals) != 1:
            raise QueryError(f"TTEST takes a column and at most one mean: {_sql(node)!r}")
        out["mu"] = _exact(literals[0], "TTEST's mean")
    elif extra == "bins" and literals:
        out["bins"] = tuple(_exact(v, "a histogram edge") for v in literals)
    return out


def _aggregate_column(a: exp.Expression, name: str, node: exp.Expression, scope: _Scope) -> str:
    if isinstance(a, exp.Column):
        return scope.column(a)
    if isinstance(a, exp.Star):
        raise QueryError(f"{name}(*) is not supported; only COUNT(*)")
    raise QueryError(f"aggregates take column names, not expressions: {_sql(node)!r}")


def _exact(v: str | int | Decimal | bool, what: str) -> Decimal:
    if isinstance(v, bool | str):
        raise QueryError(f"{what} must be a number")
    return Decimal(v) if isinstance(v, int) else v


def _quantile(v: str | int | Decimal | bool) -> Fraction:
    q = Fraction(_exact(v, "a quantile"))
    if not 0 <= q <= 1:
        raise QueryError(f"a quantile must be in [0, 1], not {v}")
    return q


def _percentile(node: exp.WithinGroup, scope: _Scope) -> dict[str, Any]:
    inner, order = node.this, node.expression
    if isinstance(inner, exp.PercentileDisc) or not isinstance(inner, exp.PercentileCont):
        raise QueryError(f"WITHIN GROUP is supported for PERCENTILE_CONT only, not {_sql(inner)!r}")
    _only(inner, {"this"}, "in PERCENTILE_CONT")
    q = _quantile(_literal(inner.this))
    if not isinstance(order, exp.Order) or len(order.expressions) != 1:
        raise QueryError("PERCENTILE_CONT(q) WITHIN GROUP (ORDER BY column) orders by one column")
    _only(order, {"expressions"}, "in WITHIN GROUP")
    ordered = order.expressions[0]
    if not isinstance(ordered, exp.Ordered):
        raise QueryError("PERCENTILE_CONT(q) WITHIN GROUP (ORDER BY column) orders by one column")
    col = _aggregate_column(ordered.this, "PERCENTILE_CONT", node, scope)
    if ordered.args.get("desc"):
        q = 1 - q
    return {"op": "quantile", "columns": (col,), "q": q}


def parse_sql(text: str) -> list[Query]:
    """One SELECT → one Query per aggregate (in SELECT order), each with the tables, filter and groups.

    Everything outside the subset in the module docstring is refused with a
    QueryError naming the construct (ORDER BY, LIMIT, HAVING, DISTINCT,
    window functions, expressions inside aggregates, subqueries other than
    the union form, other joins, ...).
    """
    _check_text(text, "SQL statement")
    try:
        statements = [s for s in sqlglot.parse(text) if s is not None]
    except Exception as e:  # sqlglot's errors, RecursionError, anything it raises on garbage
        raise _parse_failure("SQL statement", e) from None
    if len(statements) != 1:
        raise QueryError(f"give exactly one SELECT statement, not {len(statements)}")
    select = statements[0]
    if isinstance(select, exp.Union | exp.Intersect | exp.Except):
        kind = type(select).__name__.upper()
        raise QueryError(f"{kind} of SELECTs is not supported: {_UNION_HINT}")
    if not isinstance(select, exp.Select):
        raise QueryError(f"only SELECT is supported, not {type(select).__name__.upper()}")
    try:
        return _select(select)
    except RecursionError:
        raise QueryError("the SQL statement is nested too deeply") from None


def _select(select: exp.Select) -> list[Query]:
    _only(select, {"expressions", "from", "from_", "joins", "where", "group"}, "(qstore's SQL subset)")
    frm = _from(select)
    where = None
    if select.args.get("where") is not None:
        where = _condition(select.args["where"].this, frm.scope)
    group_by: tuple[str, ...] = ()
    group = select.args.get("group")
    if group is not None:
        _only(group, {"expressions"}, "in GROUP BY")
        for g in group.expressions:
            if not isinstance(g, exp.Column):
                raise QueryError(f"GROUP BY takes column names, not {_sql(g)!r}")
        group_by = tuple(frm.scope.column(g) for g in group.expressions)
        if len(set(group_by)) != len(group_by):
            raise QueryError("GROUP BY names a column twice")
    plain: list[str] = []
    aggregates = []
    for item in select.expressions:
        node = item.this if isinstance(item, exp.Alias) else item
        if isinstance(node, exp.Star):
            raise QueryError("SELECT * is not supported: name the aggregates (COUNT(*), AVG(x), ...)")
        if isinstance(node, exp.Column):
            plain.append(frm.scope.column(node))
        else:
            aggregates.append(_aggregate(node, frm.scope))
    for c in plain:
        if c not in group_by:
            raise QueryError(f"column {c!r} is neither aggregated nor in GROUP BY")
    for g in group_by:
        if g not in plain:
            raise QueryError(f"GROUP BY column {g!r} must also be selected")
    if not aggregates:
        raise QueryError("SELECT needs at least one aggregate (COUNT(*), AVG(x), ...)")
    if len(aggregates) > MAX_AGGREGATES:
        raise QueryError(f"at most {MAX_AGGREGATES} aggregates per statement")
    return [Query(tables=frm.tables, where=where, group_by=group_by, join=frm.join, **a) for a in aggregates]
