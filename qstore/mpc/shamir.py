"""Shamir secret sharing of field vectors over F_p (hazmat: raw shares and x-coordinates).

A secret vector is hidden elementwise: element j is the constant term of its
own random polynomial f_j of degree t, and party x holds f_j(x) for every j.
Any t+1 shares determine the secret; any t are uniformly distributed whatever
the secret. Everything is vectorised: one :func:`qstore.field.lincomb` per
output share, whatever the vector's shape.

Parties are identified by their x-coordinate (node index 1..n); x = 0 is the
secret itself and never a party.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np

from qstore import field
from qstore.errors import LocalError, MixedShares, NotEnoughShares
from qstore.field import P, Vec

__all__ = ["consistent", "lagrange", "reconstruct", "share"]


def _check_xs(xs: Sequence[int]) -> tuple[int, ...]:
    xs = tuple(xs)
    if not all(isinstance(x, int) and not isinstance(x, bool) and 0 < x < P for x in xs):
        raise LocalError("share coordinates must be integers in 1..p-1")
    if len(set(xs)) != len(xs):
        raise LocalError("share coordinates must be distinct")
    return xs


def share(secret: Vec, xs: Sequence[int], t: int, rng=None) -> dict[int, Vec]:
    """Shares of ``secret`` (any shape) at each x in ``xs``, on random polynomials of degree ``t``.

    ``rng``: a :class:`qstore.rng.RandomSource` for the coefficients, default the OS.
    """
    field.check(secret)
    xs = _check_xs(xs)
    if not isinstance(t, int) or t < 0:
        raise LocalError("degree t must be a non-negative integer")
    terms = [secret, *field.random((t,) + secret.shape[:-1], rng)]
    return {x: field.lincomb([pow(x, i, P) for i in range(t + 1)], terms) for x in xs}


@lru_cache(maxsize=512)
def _lagrange(xs: tuple[int, ...], at: int) -> tuple[int, ...]:
    out = []
    for i, xi in enumerate(xs):
        num = den = 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (at - xj) % P
                den = den * (xi - xj) % P
        out.append(num * pow(den, P - 2, P) % P)
    return tuple(out)


def lagrange(xs: Sequence[int], at: int = 0) -> list[int]:
    """Coefficients c_i with f(at) = Σ c_i f(xs[i]) for every polynomial f of degree < len(xs) (cached)."""
    return list(_lagrange(_check_xs(xs), at % P))


def _ordered(shares: Mapping[int, Vec]) -> tuple[tuple[int, ...], list[Vec]]:
    if not shares:
        raise NotEnoughShares(1, 0)
    xs = tuple(sorted(shares))
    vecs = [field.check(shares[x]) for x in xs]
    if any(v.shape != vecs[0].shape for v in vecs):
        raise MixedShares("shares differ in shape")
    return xs, vecs


def reconstruct(shares: Mapping[int, Vec]) -> Vec:
    """The secret: interpolation at 0 through every given share (x → share).

    With shares of a degree-t sharing any t+1 or more give the secret; give
    more only after :func:`consistent` has vouched for them (or to open a
    sharing of higher degree).
    """
    xs, vecs = _ordered(shares)
    return field.lincomb(lagrange(xs), vecs)


def consistent(shares: Mapping[int, Vec], t: int) -> bool:
    """Whether the shares lie on one polynomial of degree ≤ t, elementwise (t+1 or fewer always do)."""
    xs, vecs = _ordered(shares)
    if len(xs) <= t + 1:
        return True
    base = xs[: t + 1]
    for x, v in zip(xs[t + 1 :], vecs[t + 1 :], strict=True):
        if not np.array_equal(field.lincomb(lagrange(base, x), vecs[: t + 1]), v):
            return False
    return True
