"""Shamir sharing of field vectors: against plain polynomial arithmetic on Python ints."""

import itertools
import random

import numpy as np
import pytest

from qstore import field
from qstore.errors import LocalError, MixedShares, NotEnoughShares
from qstore.field import P
from qstore.mpc import shamir
from qstore.rng import AesCtrRandom


def _secret(shape, seed=0):
    rnd = random.Random(seed)
    n = int(np.prod(shape, dtype=np.int64))
    vals = [rnd.randrange(P) for _ in range(n)] if n else []
    return field.from_ints(np.array(vals, dtype=object).reshape(shape))


@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (3, 4)])
@pytest.mark.parametrize(("n", "t"), [(1, 0), (3, 1), (5, 2), (7, 3)])
def test_any_t_plus_1_shares_reconstruct(shape, n, t):
    s = _secret(shape, seed=n)
    xs = list(range(1, n + 1))
    shares = shamir.share(s, xs, t, rng=AesCtrRandom(bytes(32)))
    assert set(shares) == set(xs)
    for sub in itertools.combinations(xs, t + 1):
        assert np.array_equal(shamir.reconstruct({x: shares[x] for x in sub}), s)
    assert np.array_equal(shamir.reconstruct(shares), s)
    assert shamir.consistent(shares, t)


def test_shares_are_evaluations_of_a_degree_t_polynomial():
    s = _secret((4,), seed=1)
    xs = [2, 5, 9, 11]
    shares = shamir.share(s, xs, 2)
    # recover the coefficients from 3 shares with Python ints, check the 4th and the constant term
    ints = {x: field.to_ints(v) for x, v in shares.items()}
    for j in range(4):
        pts = [(x, ints[x][j]) for x in xs[:3]]

        def f(at, pts=pts):
            acc = 0
            for i, (xi, yi) in enumerate(pts):
                num = den = 1
                for k, (xk, _) in enumerate(pts):
                    if k != i:
                        num, den = num * (at - xk) % P, den * (xi - xk) % P
                acc += yi * num * pow(den, -1, P)
            return acc % P

        assert f(0) == field.to_ints(s)[j]
        assert f(11) == ints[11][j]


def test_lagrange_matches_direct_formula_and_is_cached():
    xs = (1, 3, 4, 7)
    for at in (0, 2, 7, P - 1):
        c = shamir.lagrange(xs, at)
        # reproduces every polynomial of degree < 4 at `at`
        poly = [5, P - 2, 11, 123456789]
        val = lambda x: sum(a * pow(x, i, P) for i, a in enumerate(poly)) % P  # noqa: E731
        assert sum(ci * val(x) for ci, x in zip(c, xs)) % P == val(at)
    assert shamir.lagrange(xs) == shamir.lagrange(list(xs))
    assert shamir._lagrange.cache_info().hits > 0


def test_consistent_detects_a_wrong_share():
    s = _secret((6,), seed=2)
    shares = shamir.share(s, [1, 2, 3, 4, 5], 2)
    assert shamir.consistent(shares, 2)
    bad = dict(shares)
    bad[4] = field.add_const(bad[4], 1)
    assert not shamir.consistent(bad, 2)
    assert shamir.consistent({x: bad[x] for x in (1, 2, 4)}, 2)  # t+1 points always fit
    assert shamir.consistent(bad, 4)  # and so does any degree ≥ n-1
    # degree 2t products: consistent at 2t, not at t
    prod = {x: field.mul(v, v) for x, v in shares.items()}
    assert shamir.consistent(prod, 4)
    assert not shamir.consistent(prod, 2)
    assert np.array_equal(shamir.reconstruct(prod), field.mul(s, s))


def test_t_shares_do_not_depend_on_the_secret():
    # with the same coefficients, shares of s and of 0 differ by exactly s at every x: a share is
    # the secret plus a·x with a uniform, a one-time pad, so one share (t = 1) is uniform
    s = _secret((5,), seed=3)
    a = shamir.share(field.zeros(5), [1, 2, 3], 1, rng=AesCtrRandom(bytes(range(32))))
    b = shamir.share(s, [1, 2, 3], 1, rng=AesCtrRandom(bytes(range(32))))
    for x in (1, 2, 3):
        assert np.array_equal(field.sub(b[x], a[x]), s)


def test_errors():
    s = _secret((2,))
    with pytest.raises(LocalError):
        shamir.share(s, [1, 1, 2], 1)
    with pytest.raises(LocalError):
        shamir.share(s, [0, 1, 2], 1)
    with pytest.raises(LocalError):
        shamir.share(s, [1, 2], -1)
    with pytest.raises(NotEnoughShares):
        shamir.reconstruct({})
    with pytest.raises(MixedShares):
        shamir.reconstruct({1: s, 2: _secret((3,))})
    with pytest.raises(field.FieldError):
        shamir.share(np.zeros((2, 3), dtype=np.uint64), [1, 2], 1)
