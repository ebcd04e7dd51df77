"""bench/mpyc_baseline.py runs 3 real MPyC parties and opens the right values (smoke run, not a timing test).

Also checks bench/mpc_data.py's plaintext answers against plain numpy.
"""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import mpc_data  # noqa: E402


def test_dataset_is_deterministic_and_in_range():
    a, b = mpc_data.dataset(500, seed=7), mpc_data.dataset(500, seed=7)
    for col in ("weight", "weight10", "height", "height10", "age", "sex"):
        assert np.array_equal(a[col], b[col]) and len(a[col]) == 500
    assert not np.array_equal(a["weight"], mpc_data.dataset(500, seed=8)["weight"])
    assert a["weight"].min() >= 30.0 and a["weight"].max() <= 200.0
    assert a["height"].min() >= 140.0 and a["height"].max() <= 210.0
    assert a["age"].min() >= 0 and a["age"].max() <= 100 and set(a["sex"].tolist()) == {0, 1}
    assert np.array_equal(a["weight"], a["weight10"] / 10) and np.array_equal(a["height"], a["height10"] / 10)


def test_expected_matches_numpy():
    d = mpc_data.dataset(1001)
    w = d["weight"]
    assert mpc_data.expected("sum", d) == pytest.approx(w.sum(), rel=1e-12)
    assert mpc_data.expected("var", d) == pytest.approx(w.var(ddof=1), rel=1e-12)
    assert mpc_data.expected("filtered_mean", d) == pytest.approx(w[d["sex"] == 1].mean(), rel=1e-12)
    assert mpc_data.expected("lt_count", d) == int((w < d["lt_threshold"]).sum())
    assert mpc_data.expected("median", d) == pytest.approx(np.median(w), abs=1e-12)
    assert mpc_data.expected("median", mpc_data.dataset(1000)) == pytest.approx(
        np.median(mpc_data.dataset(1000)["weight"]), abs=1e-12)
    b0, b1, b2 = mpc_data.expected("linreg", d)
    fit = b0 + b1 * d["height"] + b2 * d["age"]
    resid = w - fit
    assert abs(resid.sum()) < 1e-6 and abs(resid @ d["height"]) < 1e-4 and abs(resid @ d["age"]) < 1e-4
    assert mpc_data.relative_error([1.0, 2.0], [1.0, 2.5]) == pytest.approx(0.2)


@pytest.mark.parametrize("op", ["sum", "lt_count"])
def test_mpyc_baseline_opens_expected_value(op):
    pytest.importorskip("mpyc")
    import mpyc_baseline

    rec = mpyc_baseline.run(op, 200, timeout_s=60)
    assert rec is not None, "MPyC parties failed or timed out (see stderr)"
    assert rec["impl"] == "mpyc" and rec["op"] == op and rec["rows"] == 200
    assert math.isfinite(rec["seconds"]) and rec["seconds"] > 0
    exact = mpc_data.expected(op, mpc_data.dataset(200))
    assert rec["expected"] == exact
    if op == "lt_count":
        assert rec["value"] == exact and rec["rel_error"] == 0
    else:
        # 200 inputs rounded to 2^-32 each: |error| <= 200 * 2^-33.
        assert abs(rec["value"] - exact) <= 200 * 2.0**-33 + 1e-9 and rec["rel_error"] < 1e-9
