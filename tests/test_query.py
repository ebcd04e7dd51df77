"""Queries: the model's validation, strict JSON, and the filter and SQL parsers (sqlglot)."""

from __future__ import annotations

import contextlib
import json
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qstore.errors import RemoteError
from qstore.query import (
    MAX_DEPTH,
    MAX_NODES,
    OPS,
    And,
    Compare,
    Join,
    Not,
    Or,
    Query,
    QueryError,
    describe,
    expr_columns,
    expr_from_json,
    expr_to_json,
    format_where,
    parse_sql,
    parse_where,
)


def C(column, op, value):
    return Compare(column, op, value)


# ------------------------------------------------------------------ filters

WHERE = [
    ("sex = 'M'", C("sex", "=", "M")),
    ("sex == 'M'", C("sex", "=", "M")),
    ("sex != 'M'", C("sex", "!=", "M")),
    ("sex <> 'M'", C("sex", "!=", "M")),
    ("age < 5", C("age", "<", 5)),
    ("age <= 5", C("age", "<=", 5)),
    ("age > 5", C("age", ">", 5)),
    ("age >= 5", C("age", ">=", 5)),
    ("5 < age", C("age", ">", 5)),
    ("5 <= age", C("age", ">=", 5)),
    ("5 > age", C("age", "<", 5)),
    ("5 = age", C("age", "=", 5)),
    ("'F' != sex", C("sex", "!=", "F")),
    ("weight > 70.25", C("weight", ">", Decimal("70.25"))),
    ("weight > -70.5", C("weight", ">", Decimal("-70.5"))),
    ("weight > -(-3)", C("weight", ">", 3)),
    ("weight > .5", C("weight", ">", Decimal("0.5"))),
    ("weight > 1e3", C("weight", ">", Decimal("1E3"))),
    ("x = 123456789012345678901234567890", C("x", "=", 123456789012345678901234567890)),
    ("smoker = TRUE", C("smoker", "=", True)),
    ("smoker != false", C("smoker", "!=", False)),
    ("smoker", C("smoker", "=", True)),
    ("NOT smoker", Not(C("smoker", "=", True))),
    ("name = 'it''s'", C("name", "=", "it's")),
    ("name = ''", C("name", "=", "")),
    ('"order" = 1', C("order", "=", 1)),
    ("(((a = 1)))", C("a", "=", 1)),
    ("a = 1 AND b = 2", And((C("a", "=", 1), C("b", "=", 2)))),
    ("a = 1 and b = 2 AND c = 3", And((C("a", "=", 1), C("b", "=", 2), C("c", "=", 3)))),
    ("a = 1 OR b = 2 OR c = 3", Or((C("a", "=", 1), C("b", "=", 2), C("c", "=", 3)))),
    ("a = 1 AND (b = 2 AND c = 3)", And((C("a", "=", 1), And((C("b", "=", 2), C("c", "=", 3)))))),
    ("a = 1 OR b = 2 AND c = 3", Or((C("a", "=", 1), And((C("b", "=", 2), C("c", "=", 3)))))),
    ("(a = 1 OR b = 2) AND c = 3", And((Or((C("a", "=", 1), C("b", "=", 2))), C("c", "=", 3)))),
    ("NOT (a = 1 OR b = 2)", Not(Or((C("a", "=", 1), C("b", "=", 2))))),
    ("NOT a = 1", Not(C("a", "=", 1))),
    ("age BETWEEN 40 AND 60", And((C("age", ">=", 40), C("age", "<=", 60)))),
    ("age NOT BETWEEN 40 AND 60", Not(And((C("age", ">=", 40), C("age", "<=", 60))))),
    ("h BETWEEN -1.5 AND 2", And((C("h", ">=", Decimal("-1.5")), C("h", "<=", 2)))),
    ("sex IN ('M', 'F')", Or((C("sex", "=", "M"), C("sex", "=", "F")))),
    ("sex IN ('M')", C("sex", "=", "M")),
    ("age NOT IN (1, 2)", Not(Or((C("age", "=", 1), C("age", "=", 2))))),
    ("sex = 'M' -- a comment", C("sex", "=", "M")),
    ("sex = 'M' AND age >= 40 AND weight BETWEEN 50 AND 90.5",
     And((C("sex", "=", "M"), C("age", ">=", 40),
          And((C("weight", ">=", 50), C("weight", "<=", Decimal("90.5"))))))),
]


@pytest.mark.parametrize(("text", "expected"), WHERE)
def test_parse_where(text, expected):
    got = parse_where(text)
    assert got == expected
    assert json.dumps(expr_to_json(got)) == json.dumps(expr_to_json(expected))  # types too (5 vs 5.0 vs True)
    assert parse_where(format_where(got)) == got


BAD_WHERE = [
    ("", "empty"),
    ("   ", "empty"),
    ("sex = 'M' AND", "cannot parse the filter"),
    ("age > ", "cannot parse"),
    ("a = 1; b = 2", "one expression"),
    ("a = b", "compares two columns"),
    ('sex = "M"', "strings take single quotes"),
    ("1 = 1", "one side of a comparison must be a column"),
    ("a + 1 = 2", "must be a column"),
    ("a = 1 + 2", "expected a literal"),
    ("a = -'x'", "cannot be negated"),
    ("a = NULL", "NULL is not supported"),
    ("a IS NULL", r"not supported in a filter: 'a IS NULL'"),
    ("a LIKE 'x%'", r"not supported in a filter: \"a LIKE 'x%'\""),
    ("a < 'M'", "strings compare with = or != only"),
    ("b > TRUE", "booleans compare with = or != only"),
    ("TRUE", "constant TRUE or FALSE"),
    ("t.a = 1", "qualified names"),
    ("a IN (SELECT x FROM t)", "IN takes a list of literals"),
    ("a BETWEEN b AND 2", "expected a literal"),
    ("f(a) = 1", "must be a column"),
    ("a = 0x10", "cannot parse"),
    ("age = 1" + "0" * 50, "more than 40 digits"),
    ("x = 1e99999", "too large an exponent"),
    ("name = '" + "x" * 257 + "'", "at most 256 characters"),
    ("a-b = 1", "must be a column"),
    (" AND ".join(f"a = {i}" for i in range(300)), "at most 256"),
    ("(" * 40 + "a = 1" + ")" * 40, "a = 1"),  # parentheses alone are not nesting
    ("NOT " * 40 + "a = 1", "nests at most 32"),
    ("sex IN (" + ", ".join(["'M'"] * 300) + ")", "IN takes 1 to 255"),
    ("x" * 70000, "more than 65536 characters"),
]


@pytest.mark.parametrize(("text", "message"), BAD_WHERE)
def test_parse_where_rejects(text, message):
    if message == "a = 1":  # deeply parenthesised but flat: fine
        assert parse_where(text) == C("a", "=", 1)
        return
    with pytest.raises(QueryError, match=message) as info:
        parse_where(text)
    assert info.value.status == 400 and isinstance(info.value, RemoteError)


def test_expression_limits_at_construction():
    e = C("a", "=", 1)
    for _ in range(MAX_DEPTH - 1):
        e = Not(e)
    assert e.depth == MAX_DEPTH
    with pytest.raises(QueryError, match="nests at most"):
        Not(e)
    wide = And(tuple(C("a", "=", i) for i in range(MAX_NODES - 1)))
    assert wide.size == MAX_NODES
    with pytest.raises(QueryError, match="at most 256"):
        Or((wide, C("b", "=", 1)))
    with pytest.raises(QueryError, match="2 to 256"):
        And((C("a", "=", 1),))
    with pytest.raises(QueryError, match="filter expressions"):
        And((C("a", "=", 1), "b = 2"))
    assert And([C("a", "=", 1), C("b", "=", 2)]).items == (C("a", "=", 1), C("b", "=", 2))
    assert And(items=(C("a", "=", 1), C("b", "=", 2))) == And((C("a", "=", 1), C("b", "=", 2)))


@pytest.mark.parametrize(("args", "message"), [
    (("1a", "=", 1), "must match"),
    (("a", "==", 1), "comparison must be one of"),
    (("a", "=", 1.5), "not float"),
    (("a", "=", None), "not NoneType"),
    (("a", "<", "x"), "strings compare"),
    (("a", "=", Decimal("NaN")), "finite"),
    (("a", "=", 10**41), "more than 40 digits"),
])
def test_compare_validates(args, message):
    with pytest.raises(QueryError, match=message):
        Compare(*args)


def test_expr_columns():
    e = parse_where("a = 1 AND (b = 2 OR NOT a = 3) AND c BETWEEN 1 AND 2")
    assert expr_columns(e) == ["a", "b", "c"]
    assert expr_columns(None) == []


# ------------------------------------------------------------------ Query


def test_query_arity():
    one = ("sum", "mean", "var", "std", "min", "max", "median", "histogram")
    for op in one:
        Query(op=op, tables=("t",), columns=("x",))
        with pytest.raises(QueryError, match=f"{op} takes 1 column, got 2"):
            Query(op=op, tables=("t",), columns=("x", "y"))
        with pytest.raises(QueryError, match="got 0"):
            Query(op=op, tables=("t",))
    Query(op="count", tables=("t",))
    Query(op="count", tables=("t",), columns=("x",))
    with pytest.raises(QueryError, match="count takes 0 or 1 column, got 2"):
        Query(op="count", tables=("t",), columns=("x", "y"))
    for op in ("cov", "corr", "crosstab", "chi2"):
        Query(op=op, tables=("t",), columns=("x", "y"))
        with pytest.raises(QueryError, match=f"{op} takes 2 columns"):
            Query(op=op, tables=("t",), columns=("x",))
    Query(op="linreg", tables=("t",), columns=("y", "x"))
    Query(op="linreg", tables=("t",), columns=tuple(f"c{i}" for i in range(16)))
    with pytest.raises(QueryError, match="linreg takes 2 to 16"):
        Query(op="linreg", tables=("t",), columns=("y",))
    with pytest.raises(QueryError, match="linreg takes 2 to 16"):
        Query(op="linreg", tables=("t",), columns=tuple(f"c{i}" for i in range(17)))
    Query(op="quantile", tables=("t",), columns=("x",), q=Fraction(1, 10))
    Query(op="ttest", tables=("t",), columns=("x",), mu=Decimal(70))
    Query(op="ttest", tables=("t",), columns=("x",), group_by=("sex",))
    with pytest.raises(QueryError, match="unknown operation"):
        Query(op="mode", tables=("t",), columns=("x",))
    assert set(OPS) == {"count", "sum", "mean", "var", "std", "min", "max", "median", "quantile", "histogram",
                        "crosstab", "cov", "corr", "linreg", "ttest", "chi2"}


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(op="quantile", columns=("x",)), "quantile needs q"),
    (dict(op="quantile", columns=("x",), q=Fraction(3, 2)), r"q must be in \[0, 1\]"),
    (dict(op="quantile", columns=("x",), q=-1), r"q must be in \[0, 1\]"),
    (dict(op="quantile", columns=("x",), q=0.5), "q must be a Fraction"),
    (dict(op="mean", columns=("x",), q=Fraction(1, 2)), "q applies to quantile only"),
    (dict(op="median", columns=("x",), q=Fraction(1, 2)), "q applies to quantile only"),
    (dict(op="mean", columns=("x",), mu=Decimal(1)), "mu applies to ttest only"),
    (dict(op="mean", columns=("x",), bins=(Decimal(1), Decimal(2))), "bins applies to histogram only"),
    (dict(op="histogram", columns=("x",), bins=(Decimal(1),)), "2 to 257 edges"),
    (dict(op="histogram", columns=("x",), bins=tuple(range(258))), "2 to 257 edges"),
    (dict(op="histogram", columns=("x",), bins=(Decimal(1), Decimal(1))), "strictly ascending"),
    (dict(op="histogram", columns=("x",), bins=(Decimal(2), Decimal(1))), "strictly ascending"),
    (dict(op="histogram", columns=("x",), bins=(0.5, 1.5)), "not float"),
    (dict(op="ttest", columns=("x",)), "ttest needs mu"),
    (dict(op="ttest", columns=("x",), group_by=("a", "b")), "ttest needs mu"),
    (dict(op="ttest", columns=("x",), mu=1.5), "not float"),
    (dict(op="mean", columns=("x",), group_by=("a", "b", "c")), "at most 2"),
    (dict(op="mean", columns=("x",), group_by=("a", "a")), "same group-by column twice"),
    (dict(op="mean", columns=("x",), tables=()), "1 to 16"),
    (dict(op="mean", columns=("x",), tables=tuple(f"t{i}" for i in range(17))), "1 to 16"),
    (dict(op="mean", columns=("x",), tables=("t", "t")), "same table twice"),
    (dict(op="mean", columns=("x",), tables=("my-table",)), "table name 'my-table'"),
    (dict(op="mean", columns=("x",), tables="t"), "list of 1 to 16"),
    (dict(op="mean", columns="x"), "got no list"),
    (dict(op="mean", columns=("x y",)), "column name"),
    (dict(op="mean", columns=("x",), where="a = 1"), "filter expression"),
    (dict(op="mean", columns=("x",), join=Join(table="t", on="id")), "joined with itself"),
    (dict(op="mean", columns=("x",), join=("u", "id")), "join must be a Join"),
])
def test_query_validates(kwargs, message):
    kwargs.setdefault("tables", ("t",))
    with pytest.raises(QueryError, match=message):
        Query(**kwargs)


def test_query_normalises():
    q = Query(op="quantile", tables=["a", "b"], columns=["x"], group_by=["s"], q=Decimal("0.25"))
    assert q.tables == ("a", "b") and q.columns == ("x",) and q.group_by == ("s",) and q.q == Fraction(1, 4)
    h = Query(op="histogram", tables=("t",), columns=("x",), bins=[0, Decimal("2.5"), 10])
    assert h.bins == (Decimal(0), Decimal("2.5"), Decimal(10))
    assert all(isinstance(b, Decimal) for b in h.bins)
    t = Query(op="ttest", tables=("t",), columns=("x",), mu=70)
    assert t.mu == Decimal(70) and isinstance(t.mu, Decimal)
    with pytest.raises(TypeError):
        Query("mean", ("t",), ("x",))  # keyword-only
    with pytest.raises(QueryError):
        Join(table="a b", on="id")


def test_describe():
    q = parse_sql("SELECT sex, AVG(weight) FROM patients WHERE sex = 'M' GROUP BY sex")[0]
    assert describe(q) == "mean(weight) where sex = 'M' by sex"
    assert describe(q, tables=True) == "mean(weight) from patients where sex = 'M' by sex"
    assert describe(Query(op="count", tables=("a", "b"))) == "count(*)"
    assert describe(Query(op="count", tables=("a", "b")), tables=True) == "count(*) from union_all(a, b)"
    x = {"tables": ("t",), "columns": ("x",)}
    assert describe(Query(op="quantile", q=Fraction(1, 4), **x)) == "quantile(x, q=0.25)"
    assert describe(Query(op="quantile", q=Fraction(1, 3), **x)) == "quantile(x, q=1/3)"
    assert describe(Query(op="ttest", mu=Decimal("70.5"), **x)) == "ttest(x, mu=70.5)"
    h = Query(op="histogram", tables=("t",), columns=("x",), bins=(Decimal(0), Decimal(10)))
    assert describe(h) == "histogram(x, bins=[0, 10])"
    j = Query(op="corr", tables=("a",), columns=("x", "y"), join=Join(table="b", on="pid"),
              where=parse_where("x > 1 OR NOT y = 2"), group_by=("s", "t"))
    label = "corr(x, y) from a join b using (pid) where x > 1 OR (NOT (y = 2)) by s, t"
    assert describe(j, tables=True) == label


# ------------------------------------------------------------------ SQL


def test_sql_issue_example():
    count, mean = parse_sql("SELECT sex, COUNT(*), AVG(weight) FROM patients GROUP BY sex")
    assert count == Query(op="count", tables=("patients",), group_by=("sex",))
    assert mean == Query(op="mean", tables=("patients",), columns=("weight",), group_by=("sex",))


SQL = [
    ("SELECT COUNT(*) FROM t", dict(op="count")),
    ("select count(x) from t", dict(op="count", columns=("x",))),
    ("SELECT SUM(x) FROM t", dict(op="sum", columns=("x",))),
    ("SELECT AVG(x) FROM t", dict(op="mean", columns=("x",))),
    ("SELECT MEAN(x) FROM t", dict(op="mean", columns=("x",))),
    ("SELECT VAR_SAMP(x) FROM t", dict(op="var", columns=("x",))),
    ("SELECT VARIANCE(x) FROM t", dict(op="var", columns=("x",))),
    ("SELECT STDDEV(x) FROM t", dict(op="std", columns=("x",))),
    ("SELECT STDDEV_SAMP(x) FROM t", dict(op="std", columns=("x",))),
    ("SELECT MIN(x) FROM t", dict(op="min", columns=("x",))),
    ("SELECT MAX(x) FROM t", dict(op="max", columns=("x",))),
    ("SELECT MEDIAN(x) FROM t", dict(op="median", columns=("x",))),
    ("SELECT QUANTILE(x, 0.9) FROM t", dict(op="quantile", columns=("x",), q=Fraction(9, 10))),
    ("SELECT QUANTILE(x, 1) FROM t", dict(op="quantile", columns=("x",), q=Fraction(1))),
    ("SELECT PERCENTILE_CONT(0.25) WITHIN GROUP (ORDER BY x) FROM t",
     dict(op="quantile", columns=("x",), q=Fraction(1, 4))),
    ("SELECT PERCENTILE_CONT(0.25) WITHIN GROUP (ORDER BY x DESC) FROM t",
     dict(op="quantile", columns=("x",), q=Fraction(3, 4))),
    ("SELECT COVAR_SAMP(x, y) FROM t", dict(op="cov", columns=("x", "y"))),
    ("SELECT CORR(x, y) FROM t", dict(op="corr", columns=("x", "y"))),
    ("SELECT LINREG(y, x1, x2) FROM t", dict(op="linreg", columns=("y", "x1", "x2"))),
    ("SELECT TTEST(x, 70) FROM t", dict(op="ttest", columns=("x",), mu=Decimal(70))),
    ("SELECT TTEST(x, -1.5) FROM t", dict(op="ttest", columns=("x",), mu=Decimal("-1.5"))),
    ("SELECT s, TTEST(x) FROM t GROUP BY s", dict(op="ttest", columns=("x",), group_by=("s",))),
    ("SELECT CHI2(a, b) FROM t", dict(op="chi2", columns=("a", "b"))),
    ("SELECT CROSSTAB(a, b) FROM t", dict(op="crosstab", columns=("a", "b"))),
    ("SELECT HISTOGRAM(x) FROM t", dict(op="histogram", columns=("x",))),
    ("SELECT HISTOGRAM(x, 0, 10.5, 20) FROM t",
     dict(op="histogram", columns=("x",), bins=(Decimal(0), Decimal("10.5"), Decimal(20)))),
    ("SELECT AVG(x) AS m FROM t", dict(op="mean", columns=("x",))),
    ("SELECT AVG(t.x) FROM t WHERE t.a = 1", dict(op="mean", columns=("x",), where=C("a", "=", 1))),
    ("SELECT AVG(p.x) FROM t AS p", dict(op="mean", columns=("x",))),
    ("SELECT AVG(x) FROM t WHERE sex = 'M' AND age BETWEEN 40 AND 60;",
     dict(op="mean", columns=("x",),
          where=And((C("sex", "=", "M"), And((C("age", ">=", 40), C("age", "<=", 60))))))),
    ("SELECT sex, smoker, COUNT(*) FROM t GROUP BY smoker, sex",
     dict(op="count", group_by=("smoker", "sex"))),
    ("SELECT COUNT(*) FROM (SELECT * FROM a UNION ALL SELECT * FROM b) AS u",
     dict(op="count", tables=("a", "b"))),
    ("SELECT COUNT(*) FROM (SELECT * FROM a UNION ALL SELECT * FROM b UNION ALL SELECT * FROM c) u "
     "WHERE u.x = 1", dict(op="count", tables=("a", "b", "c"), where=C("x", "=", 1))),
    ("SELECT COUNT(*) FROM ((SELECT * FROM a) UNION ALL (SELECT * FROM b)) AS u",
     dict(op="count", tables=("a", "b"))),
    ("SELECT COUNT(*) FROM UNION_ALL(a, b, c)", dict(op="count", tables=("a", "b", "c"))),
    ("SELECT COUNT(*) FROM union_all(a, b) AS u WHERE u.x > 0", dict(op="count", tables=("a", "b"),
                                                                    where=C("x", ">", 0))),
    ("SELECT CORR(x, y) FROM a JOIN b USING (pid)",
     dict(op="corr", tables=("a",), columns=("x", "y"), join=Join(table="b", on="pid"))),
    ("SELECT CORR(a.x, b.y) FROM a INNER JOIN b ON a.pid = b.pid WHERE b.y > 0",
     dict(op="corr", tables=("a",), columns=("x", "y"), join=Join(table="b", on="pid"),
          where=C("y", ">", 0))),
    ("SELECT CORR(p.x, v.y) FROM a p JOIN b AS v ON v.pid = p.pid",
     dict(op="corr", tables=("a",), columns=("x", "y"), join=Join(table="b", on="pid"))),
    ("SELECT COUNT(*) FROM UNION_ALL(a, b) JOIN c USING (pid)",
     dict(op="count", tables=("a", "b"), join=Join(table="c", on="pid"))),
]


@pytest.mark.parametrize(("text", "expected"), SQL)
def test_parse_sql(text, expected):
    expected = {"tables": ("t",), **expected}
    (got,) = parse_sql(text)
    assert got == Query(**expected)
    assert json.dumps(got.to_json()) == json.dumps(Query(**expected).to_json())


def test_sql_one_query_per_aggregate():
    qs = parse_sql("SELECT sex, COUNT(*), AVG(w), QUANTILE(w, 0.5), TTEST(w) FROM UNION_ALL(a, b) "
                   "WHERE age > 40 GROUP BY sex")
    assert [q.op for q in qs] == ["count", "mean", "quantile", "ttest"]
    for q in qs:
        assert q.tables == ("a", "b") and q.group_by == ("sex",) and q.where == C("age", ">", 40)


BAD_SQL = [
    ("", "empty"),
    ("SELEC x", "only SELECT"),
    ("INSERT INTO t VALUES (1)", "only SELECT is supported, not INSERT"),
    ("DROP TABLE t", "only SELECT"),
    ("SELECT AVG(x) FROM t; SELECT 1", "exactly one SELECT statement, not 2"),
    ("SELECT 1 UNION SELECT 2", "UNION of SELECTs is not supported"),
    ("SELECT AVG(x)", "FROM is missing"),
    ("SELECT AVG(x) FROM t ORDER BY 1", "ORDER BY is not supported"),
    ("SELECT AVG(x) FROM t LIMIT 1", "LIMIT is not supported"),
    ("SELECT AVG(x) FROM t LIMIT 1 OFFSET 2", "is not supported"),
    ("SELECT DISTINCT AVG(x) FROM t", "DISTINCT is not supported"),
    ("SELECT s, COUNT(*) FROM t GROUP BY s HAVING COUNT(*) > 5", "HAVING is not supported"),
    ("WITH c AS (SELECT * FROM a) SELECT COUNT(*) FROM c", "WITH is not supported"),
    ("SELECT AVG(x + 1) FROM t", "not expressions"),
    ("SELECT AVG(1) FROM t", "not expressions"),
    ("SELECT SUM(*) FROM t", r"SUM\(\*\) is not supported"),
    ("SELECT COUNT(DISTINCT x) FROM t", "DISTINCT is not supported in COUNT"),
    ("SELECT VAR_POP(x) FROM t", "population statistic.*VAR_SAMP"),
    ("SELECT STDDEV_POP(x) FROM t", "population statistic.*STDDEV_SAMP"),
    ("SELECT COVAR_POP(x, y) FROM t", "population statistic"),
    ("SELECT AVG(x) OVER () FROM t", "window functions"),
    ("SELECT COUNT(*) FILTER (WHERE x > 1) FROM t", "FILTER"),
    ("SELECT PERCENTILE_DISC(0.5) WITHIN GROUP (ORDER BY x) FROM t", "PERCENTILE_CONT only"),
    ("SELECT PERCENTILE_CONT(0.5) WITHIN GROUP (ORDER BY x, y) FROM t", "one column"),
    ("SELECT PERCENTILE_CONT(x) WITHIN GROUP (ORDER BY x) FROM t", "expected a literal"),
    ("SELECT FOO(x) FROM t", "FOO is not a supported aggregate"),
    ("SELECT MODE(x) FROM t", "not a supported aggregate"),
    ("SELECT MIN(a, b) FROM t", "MIN takes 1 column"),
    ("SELECT CORR(x, y, z) FROM t", "CORR takes 2 columns"),
    ("SELECT LINREG(y) FROM t", "LINREG takes 2 to 16"),
    ("SELECT QUANTILE(x, 1.5) FROM t", r"quantile must be in \[0, 1\]"),
    ("SELECT QUANTILE(x, 'a') FROM t", "must be a number"),
    ("SELECT TTEST(x) FROM t", "ttest needs mu"),
    ("SELECT TTEST(x, 1, 2) FROM t", "at most one mean"),
    ("SELECT HISTOGRAM(x, 10, 0) FROM t", "strictly ascending"),
    ("SELECT HISTOGRAM(x, 1) FROM t", "2 to 257 edges"),
    ("SELECT * FROM t", r"SELECT \* is not supported"),
    ("SELECT x FROM t", "neither aggregated nor in GROUP BY"),
    ("SELECT s, COUNT(*) FROM t", "'s' is neither aggregated"),
    ("SELECT COUNT(*) FROM t GROUP BY s", "'s' must also be selected"),
    ("SELECT s FROM t GROUP BY s", "at least one aggregate"),
    ("SELECT s, COUNT(*) FROM t GROUP BY s, s", "names a column twice"),
    ("SELECT COUNT(*) FROM t GROUP BY 1", "GROUP BY takes column names"),
    ("SELECT s, COUNT(*) FROM t GROUP BY ROLLUP(s)", "GROUP BY takes column names"),
    ("SELECT a, b, c, COUNT(*) FROM t GROUP BY a, b, c", "at most 2"),
    ("SELECT x + 1, COUNT(*) FROM t", "not supported in SELECT"),
    ("SELECT AVG(x) FROM a, b", "cross joins"),
    ("SELECT AVG(x) FROM a LEFT JOIN b USING (id)", "LEFT JOIN is not supported"),
    ("SELECT AVG(x) FROM a FULL OUTER JOIN b USING (id)", "JOIN is not supported"),
    ("SELECT AVG(x) FROM a CROSS JOIN b", "CROSS JOIN is not supported"),
    ("SELECT AVG(x) FROM a NATURAL JOIN b", "NATURAL JOIN is not supported"),
    ("SELECT AVG(x) FROM a JOIN b USING (id, k)", "exactly one column"),
    ("SELECT AVG(x) FROM a JOIN b ON a.id = b.pid", "same name in both tables"),
    ("SELECT AVG(x) FROM a JOIN b ON id = id", "qualify the columns"),
    ("SELECT AVG(x) FROM a JOIN b ON a.id = c.id", "not one of the two joined tables"),
    ("SELECT AVG(x) FROM a JOIN b ON a.id = a.id", "a column of each table"),
    ("SELECT AVG(x) FROM a JOIN b ON a.id > b.id", "one equality of columns"),
    ("SELECT AVG(x) FROM a JOIN b ON a.id = b.id AND a.k = b.k", "one equality of columns"),
    ("SELECT AVG(x) FROM a JOIN b USING (id) JOIN c USING (id)", "at most one JOIN"),
    ("SELECT AVG(x) FROM a JOIN a USING (id)", "joined with itself"),
    ("SELECT AVG(x) FROM a JOIN (SELECT * FROM b) AS c USING (id)", "expected a table name"),
    ("SELECT AVG(x) FROM db.t", "a database is not supported"),
    ("SELECT AVG(x) FROM t AS u(y)", "column aliases"),
    ("SELECT AVG(x) FROM (SELECT x FROM a) AS u", "SELECT \\* FROM table"),
    ("SELECT AVG(x) FROM (SELECT * FROM a WHERE y = 1) AS u", "WHERE is not supported inside a union"),
    ("SELECT AVG(x) FROM (SELECT * FROM a UNION SELECT * FROM b) AS u", "write UNION ALL"),
    ("SELECT AVG(x) FROM (SELECT * FROM a UNION ALL SELECT * FROM b ORDER BY 1) AS u",
     "ORDER BY is not supported"),
    ("SELECT AVG(x) FROM (SELECT * FROM a INTERSECT SELECT * FROM b) AS u", "each part of a union"),
    ("SELECT AVG(x) FROM (SELECT * FROM a UNION ALL SELECT * FROM a) AS u", "same table twice"),
    ("SELECT AVG(x) FROM generate_series(1, 2)", "expected a table name"),
    ("SELECT AVG(x) FROM f(a, b)", "UNION_ALL"),
    ("SELECT AVG(x) FROM UNION_ALL(a, 1)", "expected a table name"),
    ("SELECT AVG(x) FROM UNION_ALL(" + ", ".join(f"t{i}" for i in range(17)) + ")", "at most 16 tables"),
    ("SELECT AVG(x) FROM t WHERE u.x = 1", "'u' is not a table in FROM"),
    ("SELECT AVG(u.x) FROM t", "'u' is not a table in FROM"),
    ("SELECT AVG(x) FROM t WHERE x IN (SELECT y FROM u)", "IN takes a list of literals"),
    ("SELECT AVG(x) FROM t WHERE", "cannot parse the SQL statement"),
    ("SELECT AVG(x) FROM t WHERE a = b", "compares two columns"),
    ("SELECT " + ", ".join(["COUNT(*)"] * 33) + " FROM t", "at most 32 aggregates"),
]


@pytest.mark.parametrize(("text", "message"), BAD_SQL)
def test_parse_sql_rejects(text, message):
    with pytest.raises(QueryError, match=message) as info:
        parse_sql(text)
    assert info.value.status == 400


# ------------------------------------------------------------------ JSON

names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,62}", fullmatch=True)
awkward = ["a", "b", "sex", "age", "select", "order", "true", "null", "and", "date", "x_1", "NOT", "Between",
           "_"]
short_names = st.sampled_from(awkward) | names
decimals = st.decimals(allow_nan=False, allow_infinity=False, places=None).filter(
    lambda d: len(d.as_tuple().digits) <= 40 and -40 <= d.as_tuple().exponent <= 40)
numbers = st.integers(-(10**40) + 1, 10**40 - 1) | decimals
strings = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)


@st.composite
def compares(draw: st.DrawFn) -> Compare:
    column = draw(short_names)
    value = draw(numbers | strings | st.booleans())
    ops = ("=", "!=") if isinstance(value, str | bool) else ("=", "!=", "<", "<=", ">", ">=")
    return Compare(column, draw(st.sampled_from(ops)), value)


exprs = st.recursive(
    compares(),
    lambda inner: st.one_of(
        st.builds(Not, inner),
        st.lists(inner, min_size=2, max_size=4).map(lambda xs: And(tuple(xs))),
        st.lists(inner, min_size=2, max_size=4).map(lambda xs: Or(tuple(xs))),
    ),
    max_leaves=24,
)


@st.composite
def queries(draw: st.DrawFn) -> Query:
    op = draw(st.sampled_from(OPS))
    n = {"count": draw(st.integers(0, 1)), "linreg": draw(st.integers(2, 5)), "cov": 2, "corr": 2,
         "crosstab": 2, "chi2": 2}.get(op, 1)
    kw: dict = {
        "op": op,
        "tables": tuple(draw(st.lists(names, min_size=1, max_size=4, unique=True))),
        "columns": tuple(draw(st.lists(short_names, min_size=n, max_size=n))),
        "where": draw(st.none() | exprs),
        "group_by": tuple(draw(st.lists(short_names, max_size=2, unique=True))),
    }
    if op == "quantile":
        kw["q"] = draw(st.fractions(0, 1, max_denominator=10**6))
    if op == "histogram" and draw(st.booleans()):
        kw["bins"] = tuple(sorted(set(draw(st.lists(decimals, min_size=2, max_size=6)))))
        if len(kw["bins"]) < 2:
            kw["bins"] = (Decimal(0), Decimal(1))
    if op == "ttest":
        if draw(st.booleans()):
            kw["mu"] = draw(decimals)
        else:
            kw["group_by"] = (draw(short_names),)
    if draw(st.booleans()):
        kw["join"] = Join(table=draw(names.filter(lambda t: t not in kw["tables"])), on=draw(short_names))
    return Query(**kw)


def _typed(obj: object) -> str:
    return json.dumps(obj, sort_keys=True)


@given(exprs)
def test_expr_json_round_trip(e):
    obj = json.loads(json.dumps(expr_to_json(e)))
    back = expr_from_json(obj)
    assert back == e and _typed(expr_to_json(back)) == _typed(expr_to_json(e))


@given(queries())
def test_query_json_round_trip(q):
    obj = json.loads(json.dumps(q.to_json()))
    back = Query.from_json(obj)
    assert back == q and _typed(back.to_json()) == _typed(q.to_json())
    assert isinstance(describe(q, tables=True), str)


@given(exprs)
def test_format_where_round_trip(e):
    """The text describe() and the CLI print is a filter parse_where reads back to the same values."""
    assert parse_where(format_where(e)) == e


def _minimal() -> dict:
    return {"op": "mean", "tables": ["t"], "columns": ["x"]}


def test_from_json_minimal_and_defaults():
    q = Query.from_json(_minimal())
    assert q == Query(op="mean", tables=("t",), columns=("x",))
    assert Query.from_json({**q.to_json()}) == q


def _deep(n: int) -> dict:
    e: dict = {"column": "a", "op": "=", "value": 1}
    for _ in range(n - 1):
        e = {"not": e}
    return e


BAD_JSON = [
    ([], "JSON object"),
    ({"tables": ["t"]}, "needs 'op'"),
    ({"op": "mean"}, "needs 'tables'"),
    ({**_minimal(), "extra": 1}, "unknown query key 'extra'"),
    ({**_minimal(), "op": 5}, "op must be a string"),
    ({**_minimal(), "tables": "t"}, "tables must be a list"),
    ({**_minimal(), "tables": [5]}, "table name 5"),
    ({**_minimal(), "columns": ["x" * 64]}, "column name"),
    ({**_minimal(), "group_by": "sex"}, "group_by must be a list"),
    ({**_minimal(), "op": "quantile", "q": 0.5}, "q must be a string"),
    ({**_minimal(), "op": "quantile", "q": "1/0"}, "q must be a string"),
    ({**_minimal(), "op": "quantile", "q": "-1/2"}, "q must be a string"),
    ({**_minimal(), "op": "quantile", "q": "2"}, r"q must be in \[0, 1\]"),
    ({**_minimal(), "op": "quantile", "q": "abc"}, "not a number"),
    ({**_minimal(), "op": "histogram", "bins": "0,1"}, "bins must be a list"),
    ({**_minimal(), "op": "histogram", "bins": [0.5, 1]}, "decimal string"),
    ({**_minimal(), "op": "histogram", "bins": ["1", "x"]}, "not a number"),
    ({**_minimal(), "op": "histogram", "bins": [str(i) for i in range(300)]}, "at most 257"),
    ({**_minimal(), "op": "ttest", "mu": 1.5}, "decimal string"),
    ({**_minimal(), "op": "ttest", "mu": "NaN"}, "not a number"),
    ({**_minimal(), "op": "ttest", "mu": "1e999"}, "too large an exponent"),
    ({**_minimal(), "join": {"table": "u"}}, "join must be"),
    ({**_minimal(), "join": {"table": "u", "on": "id", "how": "left"}}, "join must be"),
    ({**_minimal(), "join": ["u", "id"]}, "join must be"),
    ({**_minimal(), "where": "a = 1"}, "JSON object"),
    ({**_minimal(), "where": {"column": "a", "op": "=", "value": 1.5}}, "comparison value"),
    ({**_minimal(), "where": {"column": "a", "op": "=", "value": None}}, "comparison value"),
    ({**_minimal(), "where": {"column": "a", "op": "=", "value": [1]}}, "comparison value"),
    ({**_minimal(), "where": {"column": "a", "op": "=", "value": {"decimal": 1.5}}}, "decimal string"),
    ({**_minimal(), "where": {"column": "a", "op": "=", "value": {"dec": "1"}}}, "decimal value must be"),
    ({**_minimal(), "where": {"column": "a", "op": "=", "value": "x" * 257}}, "at most 256 characters"),
    ({**_minimal(), "where": {"column": "a", "op": "=", "value": 10**41}}, "more than 40 digits"),
    ({**_minimal(), "where": {"column": "a", "op": "=~", "value": 1}}, "comparison must be one of"),
    ({**_minimal(), "where": {"column": "a", "op": 1, "value": 1}}, "op must be a string"),
    ({**_minimal(), "where": {"column": "a", "op": "=", "value": 1, "x": 1}}, "a filter node is"),
    ({**_minimal(), "where": {"and": [{"column": "a", "op": "=", "value": 1}]}}, "2 to 256"),
    ({**_minimal(), "where": {"or": {"column": "a", "op": "=", "value": 1}}}, "2 to 256"),
    ({**_minimal(), "where": {"not": [_deep(1)]}}, "JSON object"),
    ({**_minimal(), "where": _deep(MAX_DEPTH + 1)}, "nests at most 32"),
    ({**_minimal(), "where": _deep(100_000)}, "nests at most 32"),
    ({**_minimal(), "where": {"or": [_deep(1)] * 300}}, "2 to 256"),
    ({**_minimal(), "where": {"or": [{"and": [_deep(1)] * 200}, {"and": [_deep(1)] * 200}]}}, "at most 256"),
]


@pytest.mark.parametrize(("obj", "message"), BAD_JSON)
def test_from_json_rejects(obj, message):
    with pytest.raises(QueryError, match=message):
        Query.from_json(obj)


def test_from_json_depth_limit_is_inclusive():
    q = Query.from_json({**_minimal(), "where": _deep(MAX_DEPTH)})
    assert q.where is not None and q.where.depth == MAX_DEPTH


# ------------------------------------------------------------------ fuzz: only QueryError

sql_words = st.sampled_from([
    "SELECT", "FROM", "WHERE", "GROUP BY", "AND", "OR", "NOT", "(", ")", ",", "=", "<", "<=", ">", "!=", "<>",
    "'M'", "1", "-2.5", "1e3", "a", "b", "t", "u", "*", "COUNT", "AVG", "QUANTILE", "PERCENTILE_CONT",
    "WITHIN GROUP", "ORDER BY", "UNION ALL", "UNION_ALL", "JOIN", "USING", "ON", "a.id", "b.id", "BETWEEN",
    "IN", "TRUE", "NULL", "AS", "HISTOGRAM", "TTEST", "LINREG", "DESC", ";", '"x"', ".", "+", "CASE", "WHEN",
    "THEN", "END", "OVER", "FILTER", "DISTINCT", "LIMIT", "?", ":x", "$1", "[", "]", "::", "CAST", "||",
])


@given(st.lists(sql_words, min_size=1, max_size=16).map(" ".join) | st.text(max_size=80))
def test_parsers_raise_only_query_errors(text):
    for parse in (parse_where, parse_sql):
        with contextlib.suppress(QueryError):
            parse(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["op", "tables", "columns", "where", "group_by", "q", "bins", "mu", "join", "and",
                         "or", "not", "column", "value", "decimal", "table", "on", "x"]), inner, max_size=5),
    max_leaves=20,
)


@given(json_values)
def test_from_json_raises_only_query_errors(obj):
    with contextlib.suppress(QueryError):
        Query.from_json(obj)
    with contextlib.suppress(QueryError):
        expr_from_json(obj)
