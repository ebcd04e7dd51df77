"""Shamir split/combine: round trips, parameter errors, streams, secrecy."""

import io
import itertools
import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from qstore import gf256, linmap, sharing
from qstore.errors import (
    DuplicateShare,
    LocalError,
    MixedShares,
    NotEnoughShares,
    ParameterError,
    RemoteError,
)
from qstore.rng import AesCtrRandom, OsRandom
from qstore.sharing import Share

BLOCK = 16384
SIZES = [0, 1, 2, 255, 511, 512, 513, BLOCK + 1, 5 * BLOCK + 77]


@pytest.mark.parametrize("size", SIZES)
def test_roundtrip_every_subset_3_of_5(backend, size):
    data = random.Random(size).randbytes(size)
    shares = sharing.split(data, 5, 3, backend=backend)
    assert [s.x for s in shares] == [1, 2, 3, 4, 5]
    assert all(len(s.data) == size and s.k == 3 for s in shares)
    for subset in itertools.combinations(shares, 3):
        assert sharing.combine(list(subset), backend=backend) == data
    assert sharing.combine(shares, backend=backend) == data


@given(
    st.binary(max_size=2 * BLOCK + 40),
    st.integers(2, 20).flatmap(lambda n: st.tuples(st.just(n), st.integers(2, n))),
    st.randoms(use_true_random=False),
)
def test_roundtrip_any_k_subset(data, nk, rnd):
    n, k = nk
    shares = sharing.split(data, n, k)
    subset = rnd.sample(shares, k)
    assert sharing.combine(subset) == data


def test_shares_match_reference_polynomials():
    """Share x of byte p is f_p(x), f_p(0) = data[p], coefficients as drawn from the generator."""
    key = bytes(range(32))
    data = random.Random(1).randbytes(linmap.SEGMENT + 1000)
    n, k = 4, 3
    shares = sharing.split(data, n, k, rng=AesCtrRandom(key))
    # Coefficient j of byte p is keystream byte ((p // 512) * (k - 1) + j) * 512 + p % 512.
    units = -(-len(data) // 512)
    stream = bytearray(units * (k - 1) * 512)
    AesCtrRandom(key).fill(memoryview(stream))
    rows = np.frombuffer(bytes(stream), np.uint8).reshape(units, k - 1, 512).transpose(1, 0, 2)
    rows = rows.reshape(k - 1, -1)
    for p in random.Random(2).sample(range(len(data)), 300) + [0, len(data) - 1]:
        coeffs = [data[p]] + [r[p] for r in rows]
        for s in shares:
            assert s.data[p] == gf256.poly_eval(coeffs, s.x)


def test_strict_randomness_and_fresh_randomness():
    data = b"attack at dawn" * 100
    a = sharing.split(data, 3, 2, rng=OsRandom())
    b = sharing.split(data, 3, 2)
    assert sharing.combine(a[:2]) == sharing.combine(b[1:]) == data
    assert a[0].data != b[0].data  # fresh coefficients each time
    assert a[0].data != data


@pytest.mark.parametrize("n,k", [(1, 1), (5, 1), (3, 4), (256, 2), (0, 0), (3.0, 2), (True, 2)])
def test_bad_parameters(n, k):
    with pytest.raises(ParameterError):
        sharing.split(b"x", n, k)


def test_combine_errors():
    shares = sharing.split(b"secret", 5, 3)
    with pytest.raises(NotEnoughShares) as e:
        sharing.combine(shares[:2])
    assert (e.value.needed, e.value.got) == (3, 2)
    with pytest.raises(NotEnoughShares):
        sharing.combine([])
    with pytest.raises(DuplicateShare) as d:
        sharing.combine([shares[0], shares[1], shares[0]])
    assert d.value.x == 1
    with pytest.raises(MixedShares):
        sharing.combine([shares[0], shares[1], Share(x=3, data=b"short", k=3)])
    with pytest.raises(MixedShares):
        sharing.combine([shares[0], shares[1], Share(x=3, data=shares[2].data, k=4)])
    with pytest.raises(RemoteError):
        Share(x=0, data=b"", k=3)
    assert issubclass(ParameterError, LocalError) and issubclass(NotEnoughShares, RemoteError)


@pytest.mark.parametrize("size", [0, 1, 3 * BLOCK, 3 * BLOCK + 1, 7 * BLOCK + 123])
def test_streams_roundtrip_and_equal_whole_buffer_shares(backend, size):
    data = random.Random(size).randbytes(size)
    outs = [io.BytesIO() for _ in range(5)]
    seen = []
    read = sharing.split_stream(io.BytesIO(data), outs, 3, chunk_size=2 * BLOCK,
                                progress=seen.append, backend=backend)
    assert read == size == sum(seen)
    share_bytes = [o.getvalue() for o in outs]
    assert all(len(b) == size for b in share_bytes)
    # Streams combine with another chunk size, and as whole buffers.
    out = io.BytesIO()
    report = sharing.combine_stream([(x, io.BytesIO(share_bytes[x - 1])) for x in (2, 4, 5)], out, 3,
                                    chunk_size=BLOCK, backend=backend)
    assert out.getvalue() == data and report.size == size and report.bad == ()
    whole = [Share(x=x, data=share_bytes[x - 1], k=3) for x in (1, 3, 5)]
    assert sharing.combine(whole, backend=backend) == data


def test_combine_stream_corrects_and_names_bad_share():
    data = random.Random(9).randbytes(3 * BLOCK + 10)
    outs = [io.BytesIO() for _ in range(5)]
    sharing.split_stream(io.BytesIO(data), outs, 3, chunk_size=BLOCK)
    raw = [bytearray(o.getvalue()) for o in outs]
    raw[3][BLOCK + 5] ^= 0x40
    out = io.BytesIO()
    report = sharing.combine_stream([(x, io.BytesIO(bytes(raw[x - 1]))) for x in range(1, 6)], out, 3,
                                    chunk_size=BLOCK)
    assert out.getvalue() == data
    assert report.bad == (4,)


def test_stream_errors():
    for bad in (0, -1, 2**40, 1.5):
        with pytest.raises(ParameterError):
            sharing.split_stream(io.BytesIO(b"x"), [io.BytesIO() for _ in range(3)], 2, chunk_size=bad)
    with pytest.raises(MixedShares):
        sharing.combine_stream([(1, io.BytesIO(b"ab")), (2, io.BytesIO(b"abc"))], io.BytesIO(), 2)
    with pytest.raises(DuplicateShare):
        sharing.combine_stream([(1, io.BytesIO(b"ab")), (1, io.BytesIO(b"ab"))], io.BytesIO(), 2)
    with pytest.raises(NotEnoughShares):
        sharing.combine_stream([(1, io.BytesIO(b"ab"))], io.BytesIO(), 2)


class _Trickle(io.RawIOBase):
    """A reader that returns at most 1000 bytes per call, like a pipe."""

    def __init__(self, data: bytes):
        self._buf = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        chunk = self._buf.read(min(len(b), 1000))
        b[: len(chunk)] = chunk
        return len(chunk)


def test_split_stream_handles_short_reads():
    data = random.Random(3).randbytes(2 * BLOCK + 17)
    outs = [io.BytesIO() for _ in range(3)]
    sharing.split_stream(_Trickle(data), outs, 2, chunk_size=BLOCK)
    shares = [Share(x=i + 1, data=o.getvalue(), k=2) for i, o in enumerate(outs)]
    assert sharing.combine(shares[1:]) == data


# --- Secrecy -----------------------------------------------------------------
#
# For two fixed, different secrets, the joint distribution of any k-1 shares
# must be the same (uniform). Each element position is an independent trial
# (independent coefficients), so one split of an N-element secret gives N
# samples. The k-1 share values of each element are binned into 256 cells and
# the two histograms are compared with a chi-square homogeneity test at
# ALPHA per comparison; with 10 subsets x 2 binnings = 20 comparisons the
# chance of a false failure is below 20 * ALPHA = 2e-5. A positive control
# (k shares, which do determine the secret) must be rejected, proving power.

ALPHA = 1e-6
N_ELEMENTS = 1 << 18


def _shares_of_constant(value: int, n: int, k: int) -> list[np.ndarray]:
    secret = bytes([value]) * N_ELEMENTS
    return [np.frombuffer(s.data, dtype=np.uint8).astype(np.int64) for s in sharing.split(secret, n, k)]


def _homogeneity_p(cells_a: np.ndarray, cells_b: np.ndarray) -> float:
    table = np.stack([np.bincount(cells_a, minlength=256), np.bincount(cells_b, minlength=256)])
    table = table[:, table.sum(axis=0) > 0]
    return float(stats.chi2_contingency(table)[1])


def test_k_minus_1_shares_reveal_nothing():
    n, k = 5, 3
    a, b = _shares_of_constant(0x00, n, k), _shares_of_constant(0xC3, n, k)
    for i, j in itertools.combinations(range(n), k - 1):
        for binning in (lambda u, v: (u >> 4) << 4 | (v >> 4), lambda u, v: (u & 15) << 4 | (v & 15)):
            p = _homogeneity_p(binning(a[i], a[j]), binning(b[i], b[j]))
            assert p > ALPHA, (i + 1, j + 1, p)
        # and each share alone is uniform
        assert stats.chisquare(np.bincount(a[i], minlength=256)).pvalue > ALPHA


def test_secrecy_test_has_power():
    n, k = 5, 3
    a, b = _shares_of_constant(0x00, n, k), _shares_of_constant(0xC3, n, k)
    w = gf256.lagrange_weights([1, 2, 3])

    def cells(sh):  # k shares: the interpolated value, i.e. the secret
        return gf256.MUL[w[0]][sh[0]] ^ gf256.MUL[w[1]][sh[1]] ^ gf256.MUL[w[2]][sh[2]]

    assert _homogeneity_p(cells(a).astype(np.int64), cells(b).astype(np.int64)) < ALPHA


def test_interpolate_rebuilds_lost_shares_into_a_reused_buffer():
    data = random.Random(12).randbytes(3000)
    shares = sharing.split(data, 5, 3)
    out = linmap.empty_rows(2, len(data))
    got = sharing.interpolate([shares[0], shares[2], shares[4]], (2, 4), out=out)
    assert got is out
    assert out[0].tobytes() == shares[1].data and out[1].tobytes() == shares[3].data
