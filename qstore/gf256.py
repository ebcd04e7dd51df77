"""Arithmetic in GF(2^8), scalar and on numpy arrays.

The field is GF(2)[x] / (x^8 + x^4 + x^3 + x + 1), reduction polynomial
0x11B (the AES polynomial), with generator 0x03. Elements are bytes;
addition is XOR. Multiplication and inversion use 256-entry log/exp tables
and a 64 KiB product table, so array operations are single numpy indexing
steps, never a Python loop per element.

Besides the tables this module holds the small linear algebra that sharing
and decoding need (Vandermonde rows, Lagrange weights, matrix inverse); the
fast kernels over whole buffers are in :mod:`qstore.linmap`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

POLY = 0x11B
"""Reduction polynomial x^8 + x^4 + x^3 + x + 1."""
GENERATOR = 0x03

U8 = npt.NDArray[np.uint8]


def _tables() -> tuple[U8, U8]:
    exp = np.zeros(512, dtype=np.uint8)
    log = np.zeros(256, dtype=np.uint8)
    v = 1
    for i in range(255):
        exp[i] = v
        log[v] = i
        # v *= 3: v*2 ^ v, with reduction on overflow.
        v2 = v << 1
        if v2 & 0x100:
            v2 ^= POLY
        v = v2 ^ v
    exp[255:510] = exp[0:255]
    return exp, log


EXP, LOG = _tables()


def _product_table() -> U8:
    a = np.arange(256, dtype=np.intp)
    la = LOG[a].astype(np.intp)
    table = EXP[la[:, None] + la[None, :]]
    table[0, :] = 0
    table[:, 0] = 0
    return np.ascontiguousarray(table, dtype=np.uint8)


MUL = _product_table()
"""MUL[a, b] = a * b; MUL[c] is the lookup table of multiplication by c."""

INV = np.zeros(256, dtype=np.uint8)
INV[1:] = EXP[255 - LOG[1:].astype(np.intp)]


def mul(a: int, b: int) -> int:
    """Product of two field elements."""
    return int(MUL[a, b])


def inv(a: int) -> int:
    """Multiplicative inverse; 0 has none."""
    if not 0 < a < 256:
        raise ZeroDivisionError("0 has no inverse in GF(2^8)")
    return int(INV[a])


def div(a: int, b: int) -> int:
    return mul(a, inv(b))


def power(a: int, e: int) -> int:
    """a**e for e >= 0 (0**0 = 1)."""
    if e == 0:
        return 1
    if a == 0:
        return 0
    return int(EXP[(int(LOG[a]) * e) % 255])


def mul_array(c: int, arr: U8) -> U8:
    """Every element of ``arr`` times the constant ``c`` (a table lookup)."""
    return MUL[c][arr]


def vandermonde_row(x: int, k: int) -> list[int]:
    """[1, x, x^2, ..., x^(k-1)]: the share at x of a degree k-1 polynomial."""
    return [power(x, j) for j in range(k)]


def lagrange_weights(xs: Sequence[int], at: int = 0) -> list[int]:
    """Weights w_i with f(at) = sum w_i f(xs[i]) for every f of degree < len(xs).

    Raises ValueError for repeated points.
    """
    if len(set(xs)) != len(xs):
        raise ValueError("interpolation points must be distinct")
    weights = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = mul(num, at ^ xj)
                den = mul(den, xi ^ xj)
        weights.append(div(num, den))
    return weights


def mat_inv(m: Sequence[Sequence[int]]) -> list[list[int]]:
    """Inverse of a square matrix over GF(2^8) by Gauss-Jordan elimination.

    Raises ValueError when the matrix is singular.
    """
    size = len(m)
    a = [list(row) + [int(i == j) for j in range(size)] for i, row in enumerate(m)]
    for col in range(size):
        pivot = next((r for r in range(col, size) if a[r][col]), None)
        if pivot is None:
            raise ValueError("singular matrix")
        a[col], a[pivot] = a[pivot], a[col]
        f = inv(a[col][col])
        a[col] = [mul(f, v) for v in a[col]]
        for r in range(size):
            if r != col and a[r][col]:
                g = a[r][col]
                a[r] = [v ^ mul(g, w) for v, w in zip(a[r], a[col], strict=True)]
    return [row[size:] for row in a]


def poly_eval(coeffs: Sequence[int], x: int) -> int:
    """Value at x of sum coeffs[j] x^j (Horner)."""
    acc = 0
    for c in reversed(coeffs):
        acc = mul(acc, x) ^ c
    return acc
