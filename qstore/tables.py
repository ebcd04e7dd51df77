"""Table schemas and the exact integer encoding of CSV cells.

A table is a set of typed columns; every cell becomes one integer before it
is Shamir-shared over F_p (:mod:`qstore.field`), so that sums, products and
comparisons inside MPC are exact:

=============  ==========================  ===============================
type           cell text                   encoded integer (lo .. hi)
=============  ==========================  ===============================
integer        ``-12``, ``+7``, ``42.0``   the value (min .. max)
fixed          ``72.5`` (decimals d)       value · 10^d, never rounded
boolean        true/false/yes/no/1/0       1 / 0 (0 .. 1)
categorical    one of the declared values  its index (0 .. m-1), plus one
                                           0/1 column ``c=value`` per value
id             any text                    top 120 bits of SHA-256 (no bounds)
=============  ==========================  ===============================

Cells are stripped of surrounding whitespace first. A CSV is checked whole
before anything is shared: :func:`encode_csv` raises :class:`CSVError`
naming the line (1-based, the header is line 1), the column and the reason.
Messages name schema facts (bounds, domains) but never a cell's content:
an error may end up in a log, and the cells are the secret.

Limits: 256 columns, 256 values per categorical, 10^7 rows, 2^28 stored
cells (rows × stored columns) per table, 131072 characters per CSV field
(the csv module's default).
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import IO, Any

import numpy as np

from qstore.errors import RemoteError

NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
TYPES = ("integer", "fixed", "boolean", "categorical", "id")
MAX_COLUMNS = 256
MAX_VALUES = 256
MAX_VALUE_CHARS = 64
MAX_DECIMALS = 12
MAX_ROWS = 10**7
MAX_CELLS = 2**28
MAX_NUMBER_CHARS = 64
ID_BITS = 120
DEFAULT_MIN_GROUP_SIZE = 10

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
_TRUE = frozenset({"true", "yes", "1"})
_FALSE = frozenset({"false", "no", "0"})
_BOOLS = {**dict.fromkeys(_TRUE, 1), **dict.fromkeys(_FALSE, 0)}
_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+(?:\.0*)?", re.ASCII)
_DECIMAL_TEXT = re.compile(r"([+-]?)([0-9]*)(?:\.([0-9]*))?", re.ASCII)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CHUNK_ROWS = 1 << 16


class SchemaError(RemoteError):
    """A schema (TOML, JSON or constructor arguments) that qstore cannot use."""


class CellError(RemoteError):
    """A cell its column cannot hold; ``reason`` says why, without the cell's text."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class CSVError(RemoteError):
    """A CSV that does not fit its schema: ``line`` is 1-based (header = 1); ``column`` may be None."""

    def __init__(self, line: int, column: str | None, reason: str):
        self.line, self.column, self.reason = line, column, reason
        where = f"line {line}" + (f", column {column!r}" if column is not None else "")
        super().__init__(f"{where}: {reason}")


def check_name(name: object, what: str = "column") -> str:
    """A column or table name: ``[A-Za-z_][A-Za-z0-9_]{0,62}``."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        shown = repr(name)[:80]
        raise SchemaError(f"{what} name {shown} must match [A-Za-z_][A-Za-z0-9_]{{0,62}}")
    return name


def _plain_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_decimal(value: Decimal, what: str) -> Decimal:
    """Refuse NaN, infinities and exponents that would make exact arithmetic expensive."""
    if not value.is_finite():
        raise SchemaError(f"{what} must be finite")
    t = value.as_tuple()
    if len(t.digits) > 40 or not -40 <= int(t.exponent) <= 40:
        raise SchemaError(f"{what} has too many digits")
    return value


def _scaled(value: int | Decimal, decimals: int, what: str) -> int:
    """value · 10^decimals, which must be an integer."""
    x = Fraction(value) * 10**decimals
    if x.denominator != 1:
        raise SchemaError(f"{what} has more than {decimals} decimals")
    return int(x)


def _unscaled(v: int, decimals: int) -> Decimal:
    """The Decimal v · 10^-decimals with exactly ``decimals`` places (exact: built from text)."""
    return Decimal(f"{v}e-{decimals}")


@dataclass(frozen=True, kw_only=True)
class Column:
    """One typed column; valid by construction.

    ``min``/``max`` are ints for integer columns and Decimals with exactly
    ``decimals`` places for fixed ones (an int given is converted); other
    types have neither.
    """

    name: str
    type: str
    min: int | Decimal | None = None
    max: int | Decimal | None = None
    decimals: int | None = None
    values: tuple[str, ...] = ()
    _index: dict[str, int] = field(init=False, repr=False, compare=False)
    _lo: int | None = field(init=False, repr=False, compare=False)
    _hi: int | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_name(self.name)
        what = f"column {self.name!r}"
        if self.type not in TYPES:
            raise SchemaError(f"{what}: type must be one of {', '.join(TYPES)}, not {str(self.type)[:40]!r}")
        if isinstance(self.values, list):
            object.__setattr__(self, "values", tuple(self.values))
        if not isinstance(self.values, tuple):
            raise SchemaError(f"{what}: values must be a list of strings")
        used = {"min": self.min is not None, "max": self.max is not None,
                "decimals": self.decimals is not None, "values": bool(self.values)}
        allowed = {"integer": {"min", "max"}, "fixed": {"min", "max", "decimals"},
                   "categorical": {"values"}}.get(self.type, set())
        for key, present in used.items():
            if present and key not in allowed:
                raise SchemaError(f"{what}: {key!r} does not apply to a {self.type} column")
        needed = {"integer": ("min", "max"), "fixed": ("decimals", "min", "max"),
                  "categorical": ("values",)}.get(self.type, ())
        for key in needed:
            if not used[key]:
                raise SchemaError(f"{what}: a {self.type} column needs {key!r}")
        if self.type == "integer":
            for key in ("min", "max"):
                v = getattr(self, key)
                if not _plain_int(v):
                    raise SchemaError(f"{what}: {key} must be an integer")
                if not _I64_MIN <= v <= _I64_MAX:
                    raise SchemaError(f"{what}: {key} must be within [-2^63, 2^63 - 1]")
        elif self.type == "fixed":
            d = self.decimals
            if not _plain_int(d) or not 0 <= d <= MAX_DECIMALS:
                raise SchemaError(f"{what}: decimals must be an integer in [0, {MAX_DECIMALS}]")
            for key in ("min", "max"):
                v = getattr(self, key)
                if isinstance(v, Decimal):
                    _finite_decimal(v, f"{what}: {key}")
                elif not _plain_int(v):
                    raise SchemaError(f"{what}: {key} must be an integer or a decimal")
                enc = _scaled(v, d, f"{what}: {key}")
                if not _I64_MIN <= enc <= _I64_MAX:
                    raise SchemaError(f"{what}: {key} · 10^{d} must be within [-2^63, 2^63 - 1]")
                object.__setattr__(self, key, _unscaled(enc, d))
        elif self.type == "categorical":
            self._check_values(what)
        lo, hi = self._bounds()
        if lo is not None and lo > hi:
            raise SchemaError(f"{what}: min must not exceed max")
        object.__setattr__(self, "_lo", lo)
        object.__setattr__(self, "_hi", hi)
        object.__setattr__(self, "_index", {v: i for i, v in enumerate(self.values)})

    def _bounds(self) -> tuple[int, int] | tuple[None, None]:
        if self.type == "integer":
            return self.min, self.max
        if self.type == "fixed":
            return _scaled(self.min, self.decimals, "min"), _scaled(self.max, self.decimals, "max")
        if self.type == "boolean":
            return 0, 1
        if self.type == "categorical":
            return 0, len(self.values) - 1
        return None, None

    def _check_values(self, what: str) -> None:
        if not 1 <= len(self.values) <= MAX_VALUES:
            raise SchemaError(f"{what}: needs 1 to {MAX_VALUES} values")
        for v in self.values:
            if not isinstance(v, str) or not 1 <= len(v) <= MAX_VALUE_CHARS:
                raise SchemaError(f"{what}: each value must be a string of 1 to {MAX_VALUE_CHARS} characters")
            if "=" in v or _CONTROL.search(v) or v != v.strip():
                raise SchemaError(
                    f"{what}: value {v!r} must not contain '=' or control characters, "
                    "nor begin or end with whitespace"
                )
        if len(set(self.values)) != len(self.values):
            raise SchemaError(f"{what}: values must be distinct")

    # ------------------------------------------------------------ encoding

    @property
    def scale(self) -> int:
        """10^decimals for fixed columns, 1 otherwise."""
        return 10**self.decimals if self.type == "fixed" else 1

    @property
    def lo(self) -> int | None:
        """Smallest encoded value: min (· 10^d for fixed), 0 for boolean and categorical, None for id."""
        return self._lo

    @property
    def hi(self) -> int | None:
        """Largest encoded value: max (· 10^d for fixed), 1 for boolean, m-1 for categorical, None for id."""
        return self._hi

    @property
    def bits(self) -> int:
        """Comparison width: (hi - lo).bit_length(), or 120 for id columns (equality only)."""
        if self.type == "id":
            return ID_BITS
        return (self.hi - self.lo).bit_length()

    def stored_names(self) -> list[str]:
        """Names of the stored columns: a categorical ``c`` adds one indicator ``c=value`` per value."""
        return [self.name] + [f"{self.name}={v}" for v in self.values]

    def encode(self, text: str) -> int:
        """One cell's text → its integer; raises :class:`CellError` (the reference for :func:`encode_csv`)."""
        if not isinstance(text, str):
            raise CellError("a cell must be text")
        s = text.strip()
        if not s:
            raise CellError("empty cell")
        if self.type == "integer":
            if len(s) > MAX_NUMBER_CHARS or not _INTEGER_TEXT.fullmatch(s):
                raise CellError("not an integer")
            return self._in_bounds(int(s.partition(".")[0]))
        if self.type == "fixed":
            return self._in_bounds(self._parse_fixed(s))
        if self.type == "boolean":
            v = _BOOLS.get(s.lower())
            if v is None:
                raise CellError("not a boolean (true/false, yes/no, 1/0)")
            return v
        if self.type == "categorical":
            i = self._index.get(s)
            if i is None:
                more = f", … ({len(self.values)} values)" if len(self.values) > 8 else ""
                shown = ", ".join(self.values[:8]) + more
                raise CellError(f"not one of the declared values ({shown})")
            return i
        return id_hash(s)

    def _parse_fixed(self, s: str) -> int:
        m = _DECIMAL_TEXT.fullmatch(s) if len(s) <= MAX_NUMBER_CHARS else None
        if m is None or not (m[2] or m[3]):
            raise CellError("not a number")
        sign, whole, frac = m[1], m[2] or "0", m[3] or ""
        d = self.decimals
        if frac[d:].strip("0"):
            raise CellError(f"more than {d} decimal{'s' if d != 1 else ''}")
        v = int(whole) * 10**d + int(frac[:d].ljust(d, "0") or "0")
        return -v if sign == "-" else v

    def _in_bounds(self, v: int) -> int:
        if v < self.lo:
            raise CellError(f"below the minimum {self.format(self.lo)}")
        if v > self.hi:
            raise CellError(f"above the maximum {self.format(self.hi)}")
        return v

    def decode(self, v: int) -> int | Decimal | bool | str:
        """An encoded integer → its value: int, Decimal (d places), bool or the category.

        id columns are not invertible: the hash itself comes back.
        """
        if isinstance(v, np.integer):
            v = int(v)
        if not _plain_int(v):
            raise CellError("an encoded value must be an integer")
        if self.type == "id":
            if not 0 <= v < 1 << ID_BITS:
                raise CellError("not a 120-bit id hash")
            return v
        if not self.lo <= v <= self.hi:
            raise CellError(f"encoded value outside [{self.lo}, {self.hi}]")
        if self.type == "integer":
            return v
        if self.type == "fixed":
            return _unscaled(v, self.decimals)
        if self.type == "boolean":
            return bool(v)
        return self.values[v]

    def format(self, v: int) -> str:
        """An encoded integer as canonical cell text (``72.5``, ``true``, ``M``; no exponents)."""
        value = self.decode(v)
        if isinstance(value, bool):
            return "true" if value else "false"
        return format(value, "f") if isinstance(value, Decimal) else str(value)

    # ------------------------------------------------------------ JSON

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type}
        if self.type == "integer":
            out.update(min=self.min, max=self.max)
        elif self.type == "fixed":
            out.update(decimals=self.decimals, min=format(self.min, "f"), max=format(self.max, "f"))
        elif self.type == "categorical":
            out["values"] = list(self.values)
        return out


def id_hash(text: str) -> int:
    """An id cell's integer: the top 120 bits of SHA-256 of its UTF-8 text."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:15], "big")


_SPEC_KEYS = frozenset({"type", "min", "max", "decimals", "values"})


def _column_from_spec(name: object, spec: object) -> Column:
    """One column from its TOML/JSON mapping; fixed bounds may be ints, Decimals or decimal strings."""
    check_name(name)
    what = f"column {name!r}"
    if not isinstance(spec, Mapping):
        raise SchemaError(f"{what}: expected a table of type, min, max, decimals, values")
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise SchemaError(f"{what}: unknown key {sorted(map(str, unknown))[0]!r}")
    kind = spec.get("type")
    if not isinstance(kind, str):
        raise SchemaError(f"{what}: needs a type ({', '.join(TYPES)})")
    args: dict[str, Any] = {"name": name, "type": kind}
    for key in ("min", "max"):
        if key in spec:
            v = spec[key]
            if kind == "fixed" and isinstance(v, str):
                m = _DECIMAL_TEXT.fullmatch(v) if len(v) <= MAX_NUMBER_CHARS else None
                if m is None or not (m[2] or m[3]):
                    raise SchemaError(f"{what}: {key} is not a decimal number")
                v = Decimal(v)
            elif isinstance(v, float):
                raise SchemaError(f"{what}: {key} must be an integer or a decimal string, not a float")
            args[key] = v
    if "decimals" in spec:
        args["decimals"] = spec["decimals"]
    if "values" in spec:
        values = spec["values"]
        if not isinstance(values, list | tuple):
            raise SchemaError(f"{what}: values must be a list of strings")
        args["values"] = tuple(values)
    return Column(**args)


@dataclass(frozen=True, kw_only=True)
class Schema:
    """A table's columns (in order) and its output privacy threshold; valid by construction."""

    columns: tuple[Column, ...]
    min_group_size: int = DEFAULT_MIN_GROUP_SIZE
    _by_name: dict[str, Column] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.columns, list):
            object.__setattr__(self, "columns", tuple(self.columns))
        if not isinstance(self.columns, tuple) or not all(isinstance(c, Column) for c in self.columns):
            raise SchemaError("columns must be a sequence of Column")
        if not 1 <= len(self.columns) <= MAX_COLUMNS:
            raise SchemaError(f"a schema needs 1 to {MAX_COLUMNS} columns")
        if not _plain_int(self.min_group_size) or not 1 <= self.min_group_size <= MAX_ROWS:
            raise SchemaError(f"min_group_size must be an integer in [1, {MAX_ROWS}]")
        by_name: dict[str, Column] = {}
        for c in self.columns:
            if c.name in by_name:
                raise SchemaError(f"column {c.name!r} is declared twice")
            by_name[c.name] = c
        object.__setattr__(self, "_by_name", by_name)

    def column(self, name: str) -> Column:
        """The column called ``name``; SchemaError names it if there is none."""
        try:
            return self._by_name[name]
        except (KeyError, TypeError):
            raise SchemaError(f"no column {str(name)[:80]!r} in the schema") from None

    def stored_columns(self) -> list[str]:
        """Every stored column name, in schema order (categoricals followed by their indicators)."""
        return [s for c in self.columns for s in c.stored_names()]

    def same_shape(self, other: Schema) -> bool:
        """Whether rows of ``other`` can be appended to rows of this (min_group_size may differ)."""
        return isinstance(other, Schema) and self.columns == other.columns

    # ------------------------------------------------------------ formats

    @classmethod
    def from_toml(cls, text: str | bytes) -> Schema:
        """``[table] min_group_size = 10`` and ``[columns] name = { type = ..., ... }``."""
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                raise SchemaError("the schema file is not UTF-8 text") from None
        try:
            doc = tomllib.loads(text, parse_float=Decimal)
        except tomllib.TOMLDecodeError as e:
            raise SchemaError(f"schema is not valid TOML: {e}") from None
        unknown = set(doc) - {"table", "columns"}
        if unknown:
            raise SchemaError(f"unknown section {sorted(unknown)[0]!r} (expected [table] and [columns])")
        table = doc.get("table", {})
        if not isinstance(table, dict):
            raise SchemaError("[table] must be a table")
        if set(table) - {"min_group_size"}:
            raise SchemaError(f"unknown key {sorted(set(table) - {'min_group_size'})[0]!r} in [table]")
        columns = doc.get("columns")
        if not isinstance(columns, dict) or not columns:
            raise SchemaError("the schema needs a [columns] table with at least one column")
        if len(columns) > MAX_COLUMNS:
            raise SchemaError(f"a schema has at most {MAX_COLUMNS} columns")
        cols = [_column_from_spec(n, s) for n, s in columns.items()]
        return cls(columns=tuple(cols), min_group_size=table.get("min_group_size", DEFAULT_MIN_GROUP_SIZE))

    def to_json(self) -> dict[str, Any]:
        """``{"min_group_size": n, "columns": [{"name", "type", ...}]}``; fixed bounds as decimal strings."""
        return {"min_group_size": self.min_group_size, "columns": [c.to_json() for c in self.columns]}

    @classmethod
    def from_json(cls, obj: object) -> Schema:
        """The inverse of :meth:`to_json`, strict about keys and types (nodes store this form)."""
        if not isinstance(obj, Mapping):
            raise SchemaError("a schema must be a JSON object")
        unknown = set(obj) - {"min_group_size", "columns"}
        if unknown:
            raise SchemaError(f"unknown schema key {sorted(map(str, unknown))[0]!r}")
        cols = obj.get("columns")
        if not isinstance(cols, list) or not 1 <= len(cols) <= MAX_COLUMNS:
            raise SchemaError(f"columns must be a list of 1 to {MAX_COLUMNS} columns")
        columns = []
        for spec in cols:
            if not isinstance(spec, Mapping) or "name" not in spec:
                raise SchemaError("each column must be an object with a name")
            rest = {k: v for k, v in spec.items() if k != "name"}
            columns.append(_column_from_spec(spec["name"], rest))
        if "min_group_size" not in obj:
            raise SchemaError("min_group_size is missing")
        return cls(columns=tuple(columns), min_group_size=obj["min_group_size"])


def union_schema(schemas: Sequence[Schema]) -> Schema:
    """The schema of a union of tables: identical columns; the largest min_group_size."""
    if not schemas:
        raise SchemaError("a union needs at least one table")
    first = schemas[0]
    for i, s in enumerate(schemas[1:], 2):
        if not first.same_shape(s):
            raise SchemaError(f"table {i} of the union has other columns than table 1")
    return Schema(columns=first.columns, min_group_size=max(s.min_group_size for s in schemas))


def join_schema(left: Schema, right: Schema, on: str) -> Schema:
    """The schema of an equi-join on the id column ``on``: left's columns, then right's but ``on``.

    Any other column name in both tables is ambiguous, hence an error; the
    largest min_group_size applies.
    """
    for side, s in (("left", left), ("right", right)):
        if s.column(on).type != "id":
            raise SchemaError(f"join column {on!r} of the {side} table must be of type id")
    shared = [c.name for c in right.columns if c.name != on and c.name in left._by_name]
    if shared:
        raise SchemaError(f"column {shared[0]!r} is in both joined tables; only the join column may be")
    extra = tuple(c for c in right.columns if c.name != on)
    if len(left.columns) + len(extra) > MAX_COLUMNS:
        raise SchemaError(f"the joined tables have more than {MAX_COLUMNS} columns")
    return Schema(columns=left.columns + extra, min_group_size=max(left.min_group_size, right.min_group_size))


# ------------------------------------------------------------------ CSV


@dataclass(frozen=True, kw_only=True)
class EncodedTable:
    """A CSV's cells as integers: stored column name → array of ``rows`` values.

    Every column is numpy int64, except id columns: a numpy object array of
    Python ints (120 bits do not fit int64). :func:`qstore.field.from_ints`
    takes both.
    """

    rows: int
    columns: dict[str, np.ndarray]


def _records(source: str | bytes | IO[str] | IO[bytes]) -> Iterator[tuple[int, list[str]]]:
    """(first line of the record, fields) per CSV record; blank lines skipped."""
    if isinstance(source, bytes | bytearray | memoryview):
        raw = bytes(source)
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise CSVError(raw.count(b"\n", 0, e.start) + 1, None, "not UTF-8 text") from None
        stream: Iterable[str] = io.StringIO(text, newline="")
    elif isinstance(source, str):
        stream = io.StringIO(source, newline="")
    elif isinstance(source, io.RawIOBase | io.BufferedIOBase):
        yield from _records(source.read())
        return
    else:
        stream = source
    reader = csv.reader(stream, strict=True)
    end = 0
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            reason = str(e)
            if "field larger than field limit" in reason:
                reason = f"a field is longer than {csv.field_size_limit()} characters"
            raise CSVError(end + 1, None, f"malformed CSV: {reason}") from None
        except UnicodeDecodeError:
            raise CSVError(end + 1, None, "not UTF-8 text") from None
        start, end = end + 1, reader.line_num
        if record:
            yield start, record


def _header(line: int, record: list[str], schema: Schema) -> list[Column]:
    if record and record[0].startswith("\ufeff"):
        record = [record[0][1:]] + record[1:]
    names = [f.strip() for f in record]
    seen: set[str] = set()
    cols = []
    for i, n in enumerate(names, 1):
        if not n:
            raise CSVError(line, None, f"header field {i} is empty")
        if n in seen:
            raise CSVError(line, n, "appears twice in the header")
        seen.add(n)
        try:
            cols.append(schema.column(n))
        except SchemaError:
            hint = [c.name for c in schema.columns if c.name.lower() == n.lower()]
            more = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise CSVError(line, n, f"is not a column of the schema{more}") from None
    for c in schema.columns:
        if c.name not in seen:
            raise CSVError(line, c.name, "is missing from the header")
    return cols


def _int_fast(cells: list[str], lo: int, hi: int) -> np.ndarray | None:
    """Integers of up to 18 digits, no whitespace: one regex over the chunk, one int() per cell."""
    if len(cells) == 0:
        return np.zeros(0, dtype=np.int64)
    joined = "\n".join(cells)
    if joined.count("\n") != len(cells) - 1 or not _FAST_INT.fullmatch(joined):
        return None
    a = np.fromiter(map(int, cells), dtype=np.int64, count=len(cells))
    return a if lo <= a.min() and a.max() <= hi else None


_FAST_INT = re.compile(r"(?:[+-]?[0-9]{1,18}\n)*[+-]?[0-9]{1,18}", re.ASCII)


def _fixed_fast(cells: list[str], col: Column) -> np.ndarray | None:
    """Fixed-point cells of plain form (``-12.5``, ``7``): digits shifted by text, never through float."""
    d = col.decimals
    if len(cells) == 0:
        return np.zeros(0, dtype=np.int64)
    joined = "\n".join(cells)
    frac = rf"(?:\.[0-9]{{1,{d}}})?" if d else ""
    pattern = _fixed_patterns.get(d)
    if pattern is None:
        item = rf"[+-]?[0-9]{{1,{18 - d}}}{frac}"
        pattern = _fixed_patterns[d] = re.compile(rf"(?:{item}\n)*{item}", re.ASCII)
    if joined.count("\n") != len(cells) - 1 or not pattern.fullmatch(joined):
        return None
    pad = "0" * d

    def one(c: str) -> int:
        whole, _, part = c.partition(".")
        return int(whole + part + pad[len(part):])

    a = np.fromiter(map(one, cells), dtype=np.int64, count=len(cells))
    return a if col.lo <= a.min() and a.max() <= col.hi else None


_fixed_patterns: dict[int, re.Pattern[str]] = {}


def _convert(col: Column, cells: list[str]) -> np.ndarray | tuple[int, str]:
    """A chunk of one column's cells → int64 (object for ids), or (index of the first bad cell, reason)."""
    fast: np.ndarray | None = None
    if col.type == "integer":
        fast = _int_fast(cells, col.lo, col.hi)
    elif col.type == "fixed":
        fast = _fixed_fast(cells, col)
    elif col.type == "categorical":
        got = [col._index.get(c) for c in cells]
        if None not in got:
            fast = np.array(got, dtype=np.int64)
    elif col.type == "boolean":
        got = [_BOOLS.get(c.lower()) for c in cells]
        if None not in got:
            fast = np.array(got, dtype=np.int64)
    if fast is not None:
        return fast
    out = []
    for i, c in enumerate(cells):
        try:
            out.append(col.encode(c))
        except CellError as e:
            return i, e.reason
    return np.array(out, dtype=object if col.type == "id" else np.int64)


def encode_csv(source: str | bytes | IO[str] | IO[bytes], schema: Schema) -> EncodedTable:
    """A whole CSV → :class:`EncodedTable`, or :class:`CSVError` at the first bad line.

    The first record is the header (column names, any order, every schema
    column exactly once, no others). Comma-separated, double quotes, UTF-8
    (a BOM is allowed); blank lines are skipped. Work is done in chunks of
    65536 rows, so memory is the output plus one chunk of text.
    """
    records = _records(source)
    first = next(records, None)
    if first is None:
        raise CSVError(1, None, "no header row (the file is empty)")
    cols = _header(*first, schema)
    width = len(cols)
    max_rows = min(MAX_ROWS, MAX_CELLS // len(schema.stored_columns()))
    parts: dict[str, list[np.ndarray]] = {c.name: [] for c in cols}
    rows = 0
    chunk: list[list[str]] = []
    lines: list[int] = []

    def flush() -> None:
        bad: tuple[int, int, str, str] | None = None  # (row in chunk, header position, column, reason)
        converted = []
        for pos, (col, cells) in enumerate(zip(cols, zip(*chunk, strict=True), strict=True)):
            got = _convert(col, list(cells))
            if isinstance(got, tuple):
                if bad is None or (got[0], pos) < bad[:2]:
                    bad = (got[0], pos, col.name, got[1])
            else:
                converted.append((col.name, got))
        if bad is not None:
            raise CSVError(lines[bad[0]], bad[2], bad[3])
        for name, arr in converted:
            parts[name].append(arr)
        chunk.clear()
        lines.clear()

    for line, record in records:
        if len(record) != width:
            raise CSVError(line, None, f"has {len(record)} fields, the header has {width}")
        rows += 1
        if rows > max_rows:
            raise CSVError(line, None, f"too many rows: at most {max_rows} for this schema")
        chunk.append(record)
        lines.append(line)
        if len(chunk) == _CHUNK_ROWS:
            flush()
    if chunk:
        flush()
    if rows == 0:
        raise CSVError(first[0] + 1, None, "no data rows after the header")
    columns: dict[str, np.ndarray] = {}
    for c in schema.columns:
        arr = np.concatenate(parts[c.name])
        columns[c.name] = arr
        for i, v in enumerate(c.values):
            columns[f"{c.name}={v}"] = (arr == i).astype(np.int64)
    return EncodedTable(rows=rows, columns=columns)
