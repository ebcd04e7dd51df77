"""The field: tables agree with carry-less multiplication mod 0x11B."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from qstore import gf256

byte = st.integers(0, 255)


def slow_mul(a: int, b: int) -> int:
    """Schoolbook carry-less multiply, then reduce by the polynomial."""
    p = 0
    for i in range(8):
        if b >> i & 1:
            p ^= a << i
    for bit in range(14, 7, -1):
        if p >> bit & 1:
            p ^= gf256.POLY << (bit - 8)
    return p


def test_product_table_matches_schoolbook():
    a = np.arange(256)
    for b in (0, 1, 2, 3, 0x53, 0xCA, 0xFF):
        assert [int(v) for v in gf256.MUL[b][a]] == [slow_mul(int(x), b) for x in a]
    assert gf256.mul(0x53, 0xCA) == 1  # the FIPS-197 inverse pair


@given(byte, byte, byte)
def test_field_laws(a, b, c):
    assert gf256.mul(a, b) == gf256.mul(b, a)
    assert gf256.mul(a, gf256.mul(b, c)) == gf256.mul(gf256.mul(a, b), c)
    assert gf256.mul(a, b ^ c) == gf256.mul(a, b) ^ gf256.mul(a, c)
    if a:
        assert gf256.mul(a, gf256.inv(a)) == 1


@given(st.lists(byte, min_size=1, max_size=6), st.sets(st.integers(1, 255), min_size=6, max_size=6))
def test_lagrange_recovers_polynomial(coeffs, xs):
    xs = sorted(xs)[: len(coeffs)]
    ys = [gf256.poly_eval(coeffs, x) for x in xs]
    w = gf256.lagrange_weights(xs, 0)
    acc = 0
    for wi, yi in zip(w, ys, strict=True):
        acc ^= gf256.mul(wi, yi)
    assert acc == coeffs[0]


def test_mat_inv_roundtrip():
    m = [gf256.vandermonde_row(x, 4) for x in (1, 7, 9, 200)]
    mi = gf256.mat_inv(m)
    for i in range(4):
        for j in range(4):
            v = 0
            for t in range(4):
                v ^= gf256.mul(m[i][t], mi[t][j])
            assert v == (1 if i == j else 0)
