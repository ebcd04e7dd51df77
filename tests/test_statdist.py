"""p-values without scipy, checked against scipy."""

from __future__ import annotations

import math

import mpmath
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from qstore import statdist


def _t_sf_exact(t: float, df: float) -> float:
    """P(T > t) in 50-digit arithmetic (scipy's own is off by ~1e-9 at tiny t, e.g. t = 7e-9, df = 1)."""
    with mpmath.workdps(50):
        t_, df_ = mpmath.mpf(t), mpmath.mpf(df)
        tail = mpmath.betainc(df_ / 2, mpmath.mpf(1) / 2, 0, df_ / (df_ + t_ * t_), regularized=True) / 2
        return float(tail if t > 0 else 1 - tail)


@given(st.one_of(st.floats(-60, 60), st.floats(-1e-6, 1e-6)),
       st.one_of(st.sampled_from([1.0, 2.0, 3.5, 10.0, 1e4]), st.floats(0.5, 500)))
def test_t_tail_matches_exact_arithmetic(t, df):
    want = _t_sf_exact(t, df)
    assert statdist.t_sf(t, df) == pytest.approx(want, rel=1e-9, abs=1e-300)
    assert statdist.t_two_sided(t, df) == pytest.approx(min(1.0, 2 * _t_sf_exact(abs(t), df)), rel=1e-9,
                                                      abs=1e-300)
    if abs(t) > 1e-3:  # and scipy agrees where it is accurate
        assert statdist.t_sf(t, df) == pytest.approx(stats.t.sf(t, df), rel=1e-9, abs=1e-300)


@given(st.floats(0, 400), st.integers(1, 300))
def test_chi2_tail_matches_scipy(x, df):
    assert statdist.chi2_sf(x, df) == pytest.approx(stats.chi2.sf(x, df), rel=1e-9, abs=1e-300)


@given(st.floats(0.05, 80), st.floats(0.05, 80), st.floats(0, 1))
def test_incomplete_beta_matches_scipy(a, b, x):
    from scipy import special

    assert statdist.betainc(a, b, x) == pytest.approx(special.betainc(a, b, x), rel=1e-8, abs=1e-12)


def test_edges_and_bad_arguments():
    assert statdist.t_sf(math.inf, 3) == 0.0 and statdist.t_sf(-math.inf, 3) == 1.0
    assert statdist.t_sf(0.0, 7) == pytest.approx(0.5)
    assert statdist.chi2_sf(0.0, 4) == 1.0
    for bad in (lambda: statdist.t_sf(1.0, 0), lambda: statdist.chi2_sf(1.0, -1),
                lambda: statdist.betainc(0, 1, 0.5), lambda: statdist.betainc(1, 1, 1.5),
                lambda: statdist.gammaincc(1, -1)):
        with pytest.raises(ValueError):
            bad()
