"""Deterministic test table for the MPC statistics benchmark (bench/mpc.py, bench/mpyc_baseline.py).

Both sides of the benchmark (qstore's MPC and the MPyC baseline) call :func:`dataset` with the same
``rows`` and ``seed`` and so see the same table, and :func:`expected` gives the exact plaintext answer
each secure result is checked against.

The table: one row per person, generated from ``numpy.random.default_rng(seed)``:

=============  =========================================================================================
column         content
=============  =========================================================================================
``weight``     body weight in kg, fixed-point with 1 decimal, in [30.0, 200.0] (float64, the nearest
               double to the decimal value)
``weight10``   the same weight as an exact integer, in units of 0.1 kg (``weight == weight10 / 10``)
``height``     height in cm, fixed-point with 1 decimal, in [140.0, 210.0] (float64)
``height10``   the same height as an integer in units of 0.1 cm
``age``        age in whole years, integer 0..100 (int64)
``sex``        the categorical M/F as a code: 0 = M, 1 = F (int64)
=============  =========================================================================================

Weight depends linearly on height and age (plus sex and noise, then clipped and rounded), so the
regression has something to find. Module constants: :data:`SEX_CODES` (the categories' codes),
:data:`LT_THRESHOLD` (``c`` of the comparison count ``weight < c``, in kg; 75.0 is a value that does
occur in the data, so the strictness of ``<`` matters) and :data:`FILTER_SEX` (the category of the
filtered mean, F).

The operations (``OPS``), with their answers' units:

* ``sum``: Σ weight (kg);
* ``var``: sample variance of weight (ddof = 1, kg²);
* ``filtered_mean``: mean weight of the rows with sex == F (kg);
* ``lt_count``: the number of rows with weight < LT_THRESHOLD (a count);
* ``median``: median of weight, the mean of the two middle values when rows is even (kg);
* ``linreg``: least-squares fit weight ≈ b0 + b1·height + b2·age, as ``[b0 (kg), b1 (kg/cm),
  b2 (kg/year)]``.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np

DEFAULT_SEED = 20240601
SEX_CODES = {"M": 0, "F": 1}
FILTER_SEX = "F"
LT_THRESHOLD = 75.0  # kg
LT_THRESHOLD10 = 750  # the same, in units of 0.1 kg
WEIGHT_RANGE = (30.0, 200.0)
HEIGHT_RANGE = (140.0, 210.0)
AGE_RANGE = (0, 100)
OPS = ("sum", "var", "filtered_mean", "lt_count", "median", "linreg")
LINREG_TERMS = ("intercept", "height", "age")


def dataset(rows: int, seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """The benchmark table of ``rows`` rows (see the module docstring for columns and units)."""
    if rows < 2:
        raise ValueError("rows must be at least 2")
    rng = np.random.default_rng(seed)
    sex = rng.integers(0, 2, rows, dtype=np.int64)
    age = rng.integers(AGE_RANGE[0], AGE_RANGE[1] + 1, rows, dtype=np.int64)
    h_mean = np.where(sex == SEX_CODES["F"], 165.0, 178.0)
    height10 = np.clip(np.rint((h_mean + rng.normal(0.0, 9.0, rows)) * 10), 1400, 2100).astype(np.int64)
    height = height10 / 10
    w = -95.0 + 0.95 * height + 0.12 * age - 4.0 * sex + rng.normal(0.0, 12.0, rows)
    weight10 = np.clip(np.rint(w * 10), 300, 2000).astype(np.int64)
    return {
        "rows": rows,
        "seed": seed,
        "weight": weight10 / 10,
        "weight10": weight10,
        "height": height,
        "height10": height10,
        "age": age,
        "sex": sex,
        "lt_threshold": LT_THRESHOLD,
        "lt_threshold10": LT_THRESHOLD10,
        "filter_code": SEX_CODES[FILTER_SEX],
    }


def expected(op: str, data: dict[str, Any]) -> float | int | list[float]:
    """The exact plaintext answer of ``op`` on ``data`` (computed on the integer columns)."""
    w10 = [int(v) for v in data["weight10"]]
    n = len(w10)
    if op == "sum":
        return sum(w10) / 10
    if op == "var":
        s, s2 = sum(w10), sum(v * v for v in w10)
        return float(Fraction(n * s2 - s * s, n * (n - 1) * 100))
    if op == "filtered_mean":
        sel = [v for v, c in zip(w10, data["sex"].tolist(), strict=True) if c == data["filter_code"]]
        return float(Fraction(sum(sel), 10 * len(sel)))
    if op == "lt_count":
        return sum(1 for v in w10 if v < data["lt_threshold10"])
    if op == "median":
        s = sorted(w10)
        return s[(n - 1) // 2] / 10 if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 20
    if op == "linreg":
        x = np.column_stack([np.ones(n), data["height10"] / 10, data["age"].astype(np.float64)])
        coef, *_ = np.linalg.lstsq(x, data["weight10"] / 10, rcond=None)
        return [float(c) for c in coef]
    raise ValueError(f"unknown op {op!r}")


def relative_error(value: float | int | list[float], exact: float | int | list[float]) -> float:
    """|value - exact| / |exact|, the largest over the components for a list (linreg)."""
    if isinstance(exact, list):
        if not isinstance(value, list) or len(value) != len(exact):
            return math.inf
        return max(relative_error(v, e) for v, e in zip(value, exact, strict=True))
    if isinstance(value, list):
        return math.inf
    if exact == 0:
        return abs(float(value))
    return abs(float(value) - float(exact)) / abs(float(exact))
