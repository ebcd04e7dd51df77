"""The analyst's side of a query: from reconstructed sufficient statistics to exact results.

The nodes return, per group, ``[ok, n, values...]`` (see
:mod:`qstore.mpc.stats`); once reconstructed in the analyst's client these
are integers in the columns' encoded units (value × 10^decimals). Here they
become results with exact rational arithmetic (``Fraction``): means,
variances, regression coefficients are exact, rounded only when printed;
square roots and p-values are floats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from qstore import statdist
from qstore.mpc.stats import Plan, plan, revealed, value_layout


@dataclass
class Result:
    """One result of a query: one group, bin or cell (``group`` None when ungrouped)."""

    op: str
    column: str | None
    group: Mapping[str, str] | None
    value: Any  # int, float, dict (tests, regression) or None when suppressed
    rows: int | None
    suppressed: bool
    revealed: list[str] = field(default_factory=list)
    exact: Any = None  # the exact value (Fraction, or dict of them) where there is one
    key_spent_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "column": self.column, "group": dict(self.group) if self.group else None,
                "value": self.value, "rows": self.rows, "suppressed": self.suppressed,
                "key_spent_bytes": self.key_spent_bytes, "revealed": self.revealed}


def _f(v: Fraction) -> float | int:
    return int(v) if v.denominator == 1 else float(v)


def _solve(a: list[list[Fraction]], b: list[Fraction]) -> list[Fraction] | None:
    """Exact Gaussian elimination; None when singular."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for c in range(n):
        piv = next((r for r in range(c, n) if m[r][c] != 0), None)
        if piv is None:
            return None
        m[c], m[piv] = m[piv], m[c]
        for r in range(n):
            if r != c and m[r][c] != 0:
                k = m[r][c] / m[c][c]
                m[r] = [x - k * y for x, y in zip(m[r], m[c], strict=True)]
    return [m[i][n] / m[i][i] for i in range(n)]


def _quantile(lo: Fraction, hi: Fraction, n: int, q: Fraction) -> Fraction:
    """numpy's default (linear) quantile from the two order statistics around h = (n-1)q."""
    h = (n - 1) * q
    return lo + (h - math.floor(h)) * (hi - lo)


def _scale(schema: Any, name: str) -> int:
    return schema.column(name).scale


def finish(query: Any, schema: Any, opened: Mapping[str, Sequence[int]]) -> list[Result]:
    """Results of ``query`` from the reconstructed outputs (signed integers) of every group."""
    p: Plan = plan(query, schema)
    layout = value_layout(p)
    column = ",".join(query.columns) if query.columns else None
    note = revealed(query)
    groups = []
    for i, g in enumerate(p.groups):
        vec = [int(v) for v in opened[f"g{i}"]]
        ok, n, vals = vec[0], vec[1], dict(zip(layout, vec[2:], strict=True))
        if ok not in (0, 1):
            raise ValueError("a suppression bit reconstructed to neither 0 nor 1")
        groups.append((g, bool(ok), n, vals))
    if query.op == "ttest" and query.mu is None:
        return [_welch(query, schema, groups, column, note)]
    if query.op == "chi2":
        return [_chi2(query, p, groups, column, note)]
    out = []
    for g, ok, n, vals in groups:
        label = dict(g.label) if g.label else None
        if not ok:
            out.append(Result(op=query.op, column=column, group=label, value=None, rows=None, suppressed=True,
                              revealed=note))
            continue
        exact = _one(query, p, schema, n, vals)
        value = {k: (_f(v) if isinstance(v, Fraction) else v) for k, v in exact.items()} \
            if isinstance(exact, dict) else (_f(exact) if isinstance(exact, Fraction) else exact)
        out.append(Result(op=query.op, column=column, group=label, value=value, rows=n, suppressed=False,
                          revealed=note, exact=exact))
    return out


def _one(query: Any, p: Plan, schema: Any, n: int, vals: Mapping[str, int]) -> Any:
    op = query.op
    if op in ("count", "histogram", "crosstab"):
        return Fraction(n)
    s = _scale(schema, p.variables[0]) if p.variables else 1
    if op == "sum":
        return Fraction(vals["sx"], s)
    if op == "mean":
        return Fraction(vals["sx"], s * n) if n else None
    if op in ("var", "std"):
        if n < 2:
            return None
        var = Fraction(vals["Sxx"], n * (n - 1) * s * s)
        return var if op == "var" else math.sqrt(var)
    if op == "cov":
        if n < 2:
            return None
        return Fraction(vals["Sxy"], n * (n - 1) * s * _scale(schema, p.variables[1]))
    if op == "corr":
        den = vals["Sxx"] * vals["Syy"]
        return None if den <= 0 else vals["Sxy"] / math.sqrt(den)
    if op in ("min", "max", "median", "quantile"):
        lo, hi = Fraction(vals["lo"], s), Fraction(vals["hi"], s)
        return _quantile(lo, hi, n, p.quantiles[0]) if n else None
    if op == "ttest":
        if n < 2:
            return None
        mean = Fraction(vals["sx"], s * n)
        var = Fraction(vals["Sxx"], n * (n - 1) * s * s)
        if var == 0:
            return None
        t = float(mean - Fraction(query.mu)) / math.sqrt(var / n)
        return {"statistic": t, "p_value": statdist.t_two_sided(t, n - 1), "df": n - 1, "mean": mean}
    if op == "linreg":
        return _linreg(p, schema, n, vals)
    raise ValueError(f"no finishing for {op!r}")


def _linreg(p: Plan, schema: Any, n: int, vals: Mapping[str, int]) -> Any:
    k = len(p.variables)  # x1..x_{k-1}, y last
    scales = [_scale(schema, v) for v in p.variables]
    s1 = [Fraction(vals[f"s{i}"], scales[i]) for i in range(k)]
    s2: dict[tuple[int, int], Fraction] = {}
    for i, j in p.pairs:
        s2[(i, j)] = s2[(j, i)] = Fraction(vals[f"s{i}{j}"], scales[i] * scales[j])
    nx = k - 1
    # normal equations for [1, x1..x_nx]
    a = [[Fraction(n)] + [s1[j] for j in range(nx)]]
    a += [[s1[i]] + [s2[(i, j)] for j in range(nx)] for i in range(nx)]
    b = [s1[k - 1]] + [s2[(i, k - 1)] for i in range(nx)]
    beta = _solve(a, b)
    if beta is None or n == 0:
        return None
    y = k - 1
    sst = s2[(y, y)] - s1[y] * s1[y] / n
    sse = s2[(y, y)] - sum(beta[i] * b[i] for i in range(len(b)))
    r2 = None if sst == 0 else 1 - sse / sst
    names = ["intercept"] + list(p.variables[:nx])
    out: dict[str, Any] = {f"coef_{name}": coef for name, coef in zip(names, beta, strict=True)}
    out["r2"] = r2
    return out


def _welch(query: Any, schema: Any, groups: list[Any], column: str | None, note: list[str]) -> Result:
    s = _scale(schema, query.columns[0])
    label = {query.group_by[0]: " vs ".join(str(g.label[query.group_by[0]]) for g, *_ in groups)}
    if not all(ok for _, ok, _, _ in groups):
        return Result(op="ttest", column=column, group=label, value=None, rows=None, suppressed=True,
                      revealed=note)
    stats = []
    for _, _, n, vals in groups:
        if n < 2:
            return Result(op="ttest", column=column, group=label, value=None, rows=sum(g[2] for g in groups),
                          suppressed=False, revealed=note)
        stats.append((n, Fraction(vals["sx"], s * n), Fraction(vals["Sxx"], n * (n - 1) * s * s)))
    (n1, m1, v1), (n2, m2, v2) = stats
    se2 = v1 / n1 + v2 / n2
    if se2 == 0:
        value = None
    else:
        t = float(m1 - m2) / math.sqrt(se2)
        df = float(se2 * se2 / ((v1 / n1) ** 2 / (n1 - 1) + (v2 / n2) ** 2 / (n2 - 1)))
        value = {"statistic": t, "p_value": statdist.t_two_sided(t, df), "df": df,
                 "mean_difference": float(m1 - m2)}
    return Result(op="ttest", column=column, group=label, value=value, rows=n1 + n2, suppressed=False,
                  revealed=note, exact=value)


def _chi2(query: Any, p: Plan, groups: list[Any], column: str | None, note: list[str]) -> Result:
    ra, rb = p.extra["shape"]
    if not all(ok for _, ok, _, _ in groups):
        return Result(op="chi2", column=column, group=None, value=None, rows=None, suppressed=True,
                      revealed=note)
    counts = [[Fraction(groups[i * rb + j][2]) for j in range(rb)] for i in range(ra)]
    rows_ = [sum(r) for r in counts]
    cols_ = [sum(counts[i][j] for i in range(ra)) for j in range(rb)]
    total = sum(rows_)
    rows_kept = [i for i in range(ra) if rows_[i]]
    cols_kept = [j for j in range(rb) if cols_[j]]
    stat = Fraction(0)
    for i in rows_kept:
        for j in cols_kept:
            e = rows_[i] * cols_[j] / total
            stat += (counts[i][j] - e) ** 2 / e
    dof = (len(rows_kept) - 1) * (len(cols_kept) - 1)
    value = {"statistic": float(stat), "p_value": statdist.chi2_sf(float(stat), dof) if dof > 0 else 1.0,
             "dof": dof}
    return Result(op="chi2", column=column, group=None, value=value, rows=int(total), suppressed=False,
                  revealed=note, exact=value)
