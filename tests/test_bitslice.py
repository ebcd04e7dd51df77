"""The fast kernels equal the plain reference: byte-wise GF(2^8) on to_elements()."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qstore import bitslice, gf256
from qstore.bitslice import BLOCK

LENGTHS = [0, 1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, bitslice.SEGMENT * 2 + BLOCK + 3]


def reference(matrix, sources):
    els = [bitslice.to_elements(s) for s in sources]
    rows = []
    for row in matrix:
        acc = np.zeros(len(els[0]), dtype=np.uint8)
        for c, e in zip(row, els, strict=True):
            acc ^= gf256.MUL[c][e]
        rows.append(bitslice.from_elements(acc))
    return rows


@pytest.mark.parametrize("length", LENGTHS)
def test_linear_map_matches_reference(backend, length):
    rng = np.random.default_rng(length)
    matrix = rng.integers(0, 256, size=(4, 3)).tolist()
    matrix[0] = [1, 0, 0]
    matrix[1] = [0, 0, 0]
    sources = [rng.integers(0, 256, length, dtype=np.uint8) for _ in range(3)]
    out = bitslice.empty_rows(4, length)
    bitslice.LinearMap(matrix, backend).apply(sources, out)
    assert [r.tobytes() for r in out] == reference(matrix, sources)
    assert out[0].tobytes() == sources[0].tobytes()
    assert not out[1].any()


def test_backends_agree_on_many_terms():
    rng = np.random.default_rng(5)
    matrix = rng.integers(1, 256, size=(6, 9)).tolist()
    sources = [rng.integers(0, 256, 2 * BLOCK + 9, dtype=np.uint8) for _ in range(9)]
    outs = []
    for be in ("numpy", "numba") if bitslice.numba_available() else ("numpy",):
        out = bitslice.empty_rows(6, len(sources[0]))
        bitslice.LinearMap(matrix, be).apply(sources, out)
        outs.append(out.copy())
    assert all(np.array_equal(outs[0], o) for o in outs)
    assert reference(matrix, sources) == [r.tobytes() for r in outs[0]]


@given(st.binary(max_size=3 * BLOCK + 100))
def test_layout_is_a_bijection(data):
    el = bitslice.to_elements(data)
    assert len(el) == len(data)
    assert bitslice.from_elements(el) == data


@given(st.binary(min_size=1, max_size=2 * BLOCK + 50), st.data())
def test_elements_at_and_nonzero(data, draw):
    el = bitslice.to_elements(data)
    arr = np.frombuffer(data, dtype=np.uint8)
    pos = np.array(draw.draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=20)))
    assert np.array_equal(bitslice.elements_at(arr, pos), el[pos])
    assert np.array_equal(bitslice.nonzero_elements(arr), el != 0)


def test_apply_rejects_bad_shapes():
    lm = bitslice.LinearMap([[1, 2]], "numpy")
    a = np.zeros(10, dtype=np.uint8)
    with pytest.raises(ValueError):
        lm.apply([a], bitslice.empty_rows(1, 10))
    with pytest.raises(ValueError):
        lm.apply([a, np.zeros(11, dtype=np.uint8)], bitslice.empty_rows(1, 10))
    with pytest.raises(ValueError):
        lm.apply([a, None], bitslice.empty_rows(1, 10))  # randomness without an rng
    with pytest.raises(ValueError):
        bitslice.LinearMap([[1, 256]])
