"""Statistics programs in memory (run_local): filters at the edges of their columns, ops, t = 1 and 2."""

from __future__ import annotations

import itertools
from decimal import Decimal

import numpy as np
import pytest

from qstore import field as F
from qstore.mpc import engine, finish, shamir, stats
from qstore.query import Query, parse_where
from qstore.tables import Schema, encode_csv

SCHEMA = Schema.from_toml("""
[table]
min_group_size = 3
[columns]
age    = { type = "integer", min = -5, max = 20 }
sex    = { type = "categorical", values = ["M", "F", "X"] }
ok     = { type = "boolean" }
weight = { type = "fixed", decimals = 1, min = 1, max = 9 }
""")


def table(rows: int, seed: int) -> tuple[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    age = rng.integers(-5, 21, rows)
    age[:2] = (-5, 20)  # the bounds themselves
    sex = rng.choice(["M", "F", "X"], rows)
    ok = rng.random(rows) < 0.5
    w = rng.integers(10, 91, rows) / 10
    w[:2] = (1.0, 9.0)
    csv = "age,sex,ok,weight\n" + "".join(f"{a},{s},{str(o).lower()},{x:.1f}\n"
                                         for a, s, o, x in zip(age, sex, ok, w, strict=True))
    return csv, {"age": age, "sex": sex, "ok": ok, "weight": w}


def run(query: Query, csv: str, n: int = 3, t: int = 1):
    enc = encode_csv(csv, SCHEMA)
    xs = list(range(1, n + 1))
    shares = {x: {} for x in xs}
    for col in SCHEMA.stored_columns():
        for x, v in shamir.share(F.from_ints(enc.columns[col]), xs, t).items():
            shares[x][col] = v
    progs = {x: stats.program(engine.Context(me=x, parties=tuple(xs), t=t), query, SCHEMA, shares[x],
                              enc.rows) for x in xs}
    out = engine.run_local(progs)
    opened = {k: F.to_signed(shamir.reconstruct({x: out[x][k] for x in xs})) for k in out[1]}
    return finish.finish(query, SCHEMA, opened)


def count(where: str, csv: str, **kw) -> int | None:
    return run(Query(op="count", tables=("t",), where=parse_where(where)), csv, **kw)[0].value


CSV, D = table(40, 1)


@pytest.mark.parametrize(("col", "values"), [("age", [-7, -5, -4.5, 0, 7, 19.5, 20, 21, 99]),
                                             ("weight", [0, 1, 1.05, 4.5, 4.55, 8.95, 9, 9.01, 12])])
def test_numeric_comparisons_at_and_beyond_the_bounds(col, values):
    x = D[col]
    for v, op in itertools.product(values, ["<", "<=", ">", ">=", "=", "!="]):
        want = int({"<": x < v, "<=": x <= v, ">": x > v, ">=": x >= v, "=": np.isclose(x, v),
                    "!=": ~np.isclose(x, v)}[op].sum())
        got = count(f"{col} {op} {v}", CSV)
        assert got == (want if want >= 3 else None), (col, op, v)


def test_categorical_boolean_and_logic():
    sex, ok, age = D["sex"], D["ok"], D["age"]
    cases = {
        "sex = 'M'": sex == "M", "sex != 'X'": sex != "X", "ok": ok, "ok = false": ~ok,
        "NOT (sex = 'F' OR age < 3)": ~((sex == "F") | (age < 3)),
        "sex IN ('M', 'F') AND age BETWEEN 0 AND 10": np.isin(sex, ["M", "F"]) & (age >= 0) & (age <= 10),
    }
    for where, mask in cases.items():
        want = int(mask.sum())
        assert count(where, CSV) == (want if want >= 3 else None), where


@pytest.mark.parametrize(("n", "t"), [(3, 1), (5, 2)])
def test_ops_match_numpy(n, t):
    csv, d = table(30, 2 + n)
    w, age = d["weight"], d["age"]
    q = {"mean": Query(op="mean", tables=("t",), columns=("weight",)),
         "var": Query(op="var", tables=("t",), columns=("weight",), where=parse_where("age >= 0")),
         "median": Query(op="median", tables=("t",), columns=("age",)),
         "q": Query(op="quantile", tables=("t",), columns=("weight",), q=Decimal("0.3")),
         "max": Query(op="max", tables=("t",), columns=("age",), where=parse_where("sex != 'X'")),
         "cov": Query(op="cov", tables=("t",), columns=("weight", "age"))}
    r = {k: run(v, csv, n, t)[0] for k, v in q.items()}
    assert r["mean"].value == pytest.approx(w.mean(), rel=1e-12)
    assert r["var"].value == pytest.approx(w[age >= 0].var(ddof=1), rel=1e-12)
    assert r["median"].value == pytest.approx(np.median(age))
    assert r["q"].value == pytest.approx(np.quantile(w, 0.3), rel=1e-12)
    assert r["max"].value == age[d["sex"] != "X"].max()
    assert r["cov"].value == pytest.approx(np.cov(w, age)[0, 1], rel=1e-12)


def test_query_errors_name_the_problem():
    for where, needle in [("sex < 3", "categorical"), ("sex = 'Q'", "no value"), ("nope = 1", "nope")]:
        with pytest.raises(stats.PlanError, match=needle):
            count(where, CSV)
    with pytest.raises(stats.PlanError, match="numeric"):
        run(Query(op="mean", tables=("t",), columns=("sex",)), CSV)
