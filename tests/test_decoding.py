"""Robust decoding: wrong shares are corrected and named, never silently returned."""

import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qstore import decoding, sharing
from qstore.errors import ShareCorruption
from qstore.sharing import Share

BLOCK = 16384  # any size; several kernel groups plus a ragged tail


def corrupt(share: Share, positions, rnd: random.Random) -> Share:
    data = bytearray(share.data)
    for p in positions:
        data[p] ^= rnd.randrange(1, 256)
    return Share(x=share.x, data=bytes(data), k=share.k)


@pytest.mark.parametrize("size", [1, 100, BLOCK + 7, 3 * BLOCK])
@pytest.mark.parametrize("bad_x", [1, 3, 5])
def test_one_bad_share_of_five_is_corrected_and_named(backend, size, bad_x):
    rnd = random.Random(size * 7 + bad_x)
    data = rnd.randbytes(size)
    shares = sharing.split(data, 5, 3, backend=backend)
    positions = rnd.sample(range(size), min(size, 5))
    shares[bad_x - 1] = corrupt(shares[bad_x - 1], positions, rnd)
    result = decoding.decode(shares, 3, backend=backend)
    assert result.data == data
    assert result.bad == (bad_x,)
    assert sharing.combine(shares, backend=backend) == data


def test_whole_share_replaced_by_noise():
    data = random.Random(2).randbytes(4 * BLOCK + 11)
    shares = sharing.split(data, 5, 3)
    shares[1] = Share(x=2, data=random.Random(3).randbytes(len(data)), k=3)
    assert decoding.decode(shares) == (data, (2,))


def test_scattered_errors_in_different_shares_9_of_5():
    """Two errors per element, in different shares at different elements."""
    rnd = random.Random(4)
    data = rnd.randbytes(2 * BLOCK + 99)
    shares = sharing.split(data, 9, 5)
    bad = {2: rnd.sample(range(len(data)), 300), 7: rnd.sample(range(len(data)), 300),
           9: rnd.sample(range(len(data)), 300)}
    # keep at most two wrong shares at any element
    used: dict[int, int] = {}
    for x, pos in bad.items():
        keep = [p for p in pos if used.get(p, 0) < 2]
        for p in keep:
            used[p] = used.get(p, 0) + 1
        shares[x - 1] = corrupt(shares[x - 1], keep, rnd)
    result = decoding.decode(shares)
    assert result.data == data
    assert result.bad == (2, 7, 9)


def test_too_many_wrong_shares_raise():
    rnd = random.Random(5)
    data = rnd.randbytes(1000)
    shares = sharing.split(data, 5, 3)
    shares[0] = corrupt(shares[0], range(1000), rnd)
    shares[3] = corrupt(shares[3], range(1000), rnd)
    with pytest.raises(ShareCorruption):
        sharing.combine(shares)


def test_k_plus_one_detects_but_cannot_correct():
    rnd = random.Random(6)
    data = rnd.randbytes(500)
    shares = sharing.split(data, 4, 3)
    shares[2] = corrupt(shares[2], [17], rnd)
    with pytest.raises(ShareCorruption) as e:
        sharing.combine(shares)
    assert "cannot correct" in str(e.value)
    # any 3 still interpolate (no check possible), and the good 3 give the data
    assert sharing.combine([shares[0], shares[1], shares[3]]) == data


@given(st.integers(0, 255).map(lambda v: v), st.data())
def test_berlekamp_welch_scalar(secret, draw):
    n, k = 7, 3
    coeffs = [secret] + draw.draw(st.lists(st.integers(0, 255), min_size=k - 1, max_size=k - 1))
    from qstore import gf256

    xs = list(range(1, n + 1))
    ys = [gf256.poly_eval(coeffs, x) for x in xs]
    wrong = draw.draw(st.sets(st.integers(0, n - 1), max_size=(n - k) // 2))
    for i in wrong:
        ys[i] ^= draw.draw(st.integers(1, 255))
    poly, found = decoding.berlekamp_welch(xs, ys, k)
    assert poly == coeffs
    assert set(found) == wrong


def test_decode_agrees_with_numpy_reference_on_random_noise():
    """Every element decoded equals the true element (checked element-wise)."""
    rnd = random.Random(8)
    data = rnd.randbytes(BLOCK + 50)
    shares = sharing.split(data, 7, 3)
    for x in (2, 6):
        shares[x - 1] = corrupt(shares[x - 1], rnd.sample(range(len(data)), 2000), rnd)
    result = decoding.decode(shares)
    assert np.array_equal(np.frombuffer(result.data, np.uint8), np.frombuffer(data, np.uint8))
    assert result.bad == (2, 6)
