"""qstore.field: every kernel equal to its Python-integer reference, on random and edge values."""

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qstore import _fieldsimd, field
from qstore.field import FieldError, P
from qstore.rng import AesCtrRandom

EDGE = [0, 1, P - 1, P - 2, 2**64 - 1, 2**64, 2**126, 2**127 - 2, 2**63, 2**63 - 1, P // 2, P // 2 + 1]
elements = st.integers(0, P - 1)
needs_kernels = pytest.mark.skipif(field.backend() != "llvm", reason="no compiled kernels here")


def vec(values) -> np.ndarray:
    return field.from_ints(list(values))


def ints(v) -> list:
    return field.to_ints(v)


def rand(*shape: int) -> np.ndarray:
    return field.random(shape)


@pytest.fixture(params=["llvm", "reference"])
def path(request, monkeypatch):
    """Run a test on the compiled kernels and again on the reference paths."""
    if request.param == "reference":
        monkeypatch.setattr(field, "_kernels", lambda: None)
    elif field.backend() != "llvm":
        pytest.skip("no compiled kernels here")
    return request.param


def pairs() -> tuple[np.ndarray, np.ndarray]:
    """Every pair of edge values, then random pairs."""
    xs, ys = zip(*itertools.product(EDGE, EDGE), strict=True)
    a, b = rand(300), rand(300)
    return np.concatenate([vec(xs), a]), np.concatenate([vec(ys), b])


# ---------------------------------------------------------------- elementwise


@pytest.mark.parametrize("op", ["add", "sub", "mul"])
def test_binary_equals_reference_and_python_ints(path, op):
    a, b = pairs()
    got = getattr(field, op)(a, b)
    assert np.array_equal(got, getattr(field, f"_ref_{op}")(a, b))
    f = {"add": lambda x, y: (x + y) % P, "sub": lambda x, y: (x - y) % P, "mul": lambda x, y: x * y % P}[op]
    assert ints(got) == [f(x, y) for x, y in zip(ints(a), ints(b), strict=True)]


CONSTANTS = [0, 1, -1, 2, P - 1, P, P + 5, 2**64 + 3, -(2**200) - 7, 12345678901234567890123]


@pytest.mark.parametrize("c", CONSTANTS)
def test_scale_add_const_neg(path, c):
    a = pairs()[0]
    assert ints(field.scale(a, c)) == [x * c % P for x in ints(a)]
    assert ints(field.add_const(a, c)) == [(x + c) % P for x in ints(a)]
    assert ints(field.neg(a)) == [-x % P for x in ints(a)]


@needs_kernels
@pytest.mark.parametrize("op", ["add", "sub", "mul", "dot"])
def test_unreduced_zero_input_reads_as_zero(op):
    """p itself (the other form of 0) is accepted by the kernels and gives reduced outputs."""
    a = np.array([[2**64 - 1, 2**63 - 1]] * 5, dtype=np.uint64)
    b = vec([3, 0, P - 1, 2**64, 7])
    got = getattr(field, op)(a, b)
    assert np.array_equal(got, getattr(field, f"_ref_{op}")(a, b))
    assert np.array_equal(field.lincomb([2**64 - 1, -5], [a, b]), field._ref_lincomb([2**64 - 1, -5], [a, b]))
    assert np.array_equal(field.lincomb([2**100, -5], [a, b]), field._ref_lincomb([2**100, -5], [a, b]))
    assert np.array_equal(field.power(a, 3), field.zeros(5))
    assert np.array_equal(field.power(a, (P - 3) // 4), field.zeros(5))
    assert np.array_equal(field.inverse(a), field.zeros(5))


@pytest.mark.parametrize("shape", [(3, 4, 5), (1,), (7, 1), (0,), (3, 0), (0, 4)])
def test_multidimensional_and_empty(path, shape):
    a, b = field.random(shape), field.random(shape)
    for op in ("add", "sub", "mul"):
        got = getattr(field, op)(a, b)
        assert got.shape == shape + (2,) and got.dtype == np.uint64
        assert np.array_equal(got, getattr(field, f"_ref_{op}")(a, b))
    assert np.array_equal(field.scale(a, -3), field._ref_scale(a, -3))
    assert np.array_equal(field.power(a, 5), field._ref_pow(a, 5))
    assert np.array_equal(field.inverse(a), field._ref_pow(a, P - 2))
    if len(shape) > 1:
        assert np.array_equal(field.dot(a, b), field._ref_dot(a, b))
        assert np.array_equal(field.total(a), field._ref_sum(a))


def noncontiguous(v: np.ndarray) -> list[np.ndarray]:
    """Views of (rows, cols, 2) data that are not C-contiguous, all of shape (cols, rows, 2) or similar."""
    return [np.moveaxis(v, 0, 1), np.asfortranarray(v), v[::-1, ::-1]]


def test_noncontiguous_inputs(path):
    base = rand(6, 8)
    other = rand(8, 6)
    for a in noncontiguous(base):
        b = other if a.shape == other.shape else rand(*a.shape[:-1])
        assert not a.flags.c_contiguous or a is base
        for op in ("add", "sub", "mul"):
            assert np.array_equal(getattr(field, op)(a, b), getattr(field, f"_ref_{op}")(a, b))
            assert np.array_equal(getattr(field, op)(b, a), getattr(field, f"_ref_{op}")(b, a))
        assert np.array_equal(field.dot(a, b), field._ref_dot(a, b))
        assert np.array_equal(field.total(a), field._ref_sum(a))
        assert np.array_equal(field.lincomb([3, -1], [a, b]), field._ref_lincomb([3, -1], [a, b]))
        assert np.array_equal(field.power(a, 7), field._ref_pow(a, 7))
        assert np.array_equal(field.inverse(a), field._ref_pow(a, P - 2))
        assert np.array_equal(field.check(a), a)
    every_other = rand(20)[::2]
    assert np.array_equal(field.neg(every_other), field._ref_sub(field.zeros(10), every_other))


@pytest.mark.parametrize("op", ["add", "sub", "mul"])
def test_broadcasting(path, op):
    a = rand(4, 5)
    ref = getattr(field, f"_ref_{op}")
    for b in (rand(5), rand(1, 5), rand(4, 1), rand(1), field.from_int(7), rand(1, 1)):
        assert np.array_equal(getattr(field, op)(a, b), ref(a, b))
        assert np.array_equal(getattr(field, op)(b, a), ref(b, a))


def test_outputs_are_new_arrays_and_inputs_untouched(path):
    a, b = rand(50), rand(50)
    a0, b0 = a.copy(), b.copy()
    for out in (field.add(a, b), field.mul(a, b), field.neg(a), field.scale(a, 1), field.add_const(a, 0),
                field.lincomb([1], [a]), field.power(a, 1)):
        assert not np.shares_memory(out, a) and not np.shares_memory(out, b)
        assert np.array_equal(out, field.check(out))
    assert np.array_equal(a, a0) and np.array_equal(b, b0)


def test_sums_need_an_element_axis(path):
    with pytest.raises(FieldError):
        field.dot(rand(2)[0], rand(2)[0])
    with pytest.raises(FieldError):
        field.total(field.from_int(3))


def test_not_field_vectors_are_rejected():
    good = rand(3)
    for bad in (good.astype(np.int64), good[..., :1], [[1, 0]], good.reshape(6)):
        with pytest.raises(FieldError):
            field.add(bad, good)
        with pytest.raises(FieldError):
            field.check(bad)


# ---------------------------------------------------------------- sums


@pytest.mark.parametrize("shape", [(0,), (1,), (5,), (3, 7), (2, 3, 4), (3, 0), (0, 5)])
def test_dot_and_total(path, shape):
    a, b = field.random(shape), field.random(shape)
    d = field.dot(a, b)
    assert d.shape == shape[:-1] + (2,)
    assert np.array_equal(d, field._ref_dot(a, b))
    assert np.array_equal(field.total(a), field._ref_sum(a))


def test_dot_broadcasts_one_row(path):
    m, v = rand(4, 9), rand(9)
    assert np.array_equal(field.dot(m, v), field._ref_dot(m, v))
    assert np.array_equal(field.dot(v, m), field._ref_dot(v, m))
    col = rand(4, 1)  # broadcast along the element axis
    assert np.array_equal(field.dot(m, col), field._ref_dot(m, col))
    stack = rand(2, 1, 9)
    assert np.array_equal(field.dot(stack, m), field._ref_dot(stack, m))


def test_sums_of_largest_values_do_not_overflow():
    """(p-1)^2 = 1 and the carries of 2^17 maximal terms: the result is exact."""
    n = 1 << 17
    big = field.from_int(P - 1, n)
    assert ints(field.dot(big, big)) == n % P
    assert ints(field.total(big)) == n * (P - 1) % P
    almost = field.from_int(2**127 - 2, (3, n))
    assert ints(field.total(almost)) == [n * (2**127 - 2) % P] * 3
    coefs = [P - 1] * 10 + [2**126] * 3
    assert ints(field.lincomb(coefs, [big] * 13))[:2] == [(10 + 3 * 2**126 * (P - 1)) % P] * 2


# ---------------------------------------------------------------- lincomb


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 9, 17])
def test_lincomb(path, k):
    vecs = [rand(3, 11) for _ in range(k)]
    coefs = [int(c) for c in np.random.default_rng(k).integers(-(2**62), 2**62, k)]
    coefs[0] = P + 2**100
    for cs in (coefs, [1] * k, [0] * k, [0] + [-1] * (k - 1), [int(x) for x in ints(rand(k))]):
        assert np.array_equal(field.lincomb(cs, vecs), field._ref_lincomb(cs, vecs))


SMALL_BORDERS = [2**64 - 1, 2**64, P - 2**64 + 1, P - 2**64, -(2**64) + 1, -(2**64)]  # 64-bit kernel or not


def test_lincomb_edges(path):
    a, b = pairs()
    for cs in itertools.product([0, 1, P - 1, 2**126, *SMALL_BORDERS], repeat=2):
        assert np.array_equal(field.lincomb(list(cs), [a, b]), field._ref_lincomb(list(cs), [a, b]))
    for k in (3, 9):
        for c in SMALL_BORDERS:
            cs = [c, -3] + [5] * (k - 2)
            assert np.array_equal(field.lincomb(cs, [a] * k), field._ref_lincomb(cs, [a] * k))
    row, col = rand(5), rand(4, 1)
    assert np.array_equal(field.lincomb([2, 3], [row, col]), field._ref_lincomb([2, 3], [row, col]))
    stacked = rand(3, 6)
    assert np.array_equal(field.lincomb([1, 2, 3], stacked), field._ref_lincomb([1, 2, 3], list(stacked)))
    with pytest.raises(FieldError):
        field.lincomb([], [])
    with pytest.raises(ValueError):
        field.lincomb([1, 2], [a])


# ---------------------------------------------------------------- powers


EXPONENTS = [0, 1, 2, 3, 5, 7, 65537, (P + 1) // 4, (P - 3) // 4, P - 2, P - 1, P, 2 * P - 1, 3 * P + 10,
             2**300 + 1, 2**126 - 1, 0b1011011101111 << 60]


@pytest.mark.parametrize("e", EXPONENTS)
def test_power(path, e):
    a = np.concatenate([vec(EDGE), rand(13)])
    assert ints(field.power(a, e)) == [pow(x, e, P) for x in ints(a)]


@pytest.mark.parametrize("n", range(10))
def test_inverse_every_tail_length(path, n):
    a = rand(n)
    if n > 2:
        a[1] = 0
    inv = field.inverse(a)
    assert ints(inv) == [pow(x, P - 2, P) for x in ints(a)]
    assert all(x * y % P == (1 if x else 0) for x, y in zip(ints(a), ints(inv), strict=True))


def test_inverse_with_zeros_and_edges(path):
    a = np.concatenate([vec(EDGE * 3), rand(37), field.zeros(5), rand(3)])
    assert ints(field.inverse(a)) == [pow(x, P - 2, P) for x in ints(a)]


def test_sqrt_of_squares(path):
    x = np.concatenate([vec(EDGE), rand(40)])
    sq = field.mul(x, x)
    r = field.sqrt(sq)
    assert np.array_equal(field.mul(r, r), sq)
    assert all(y in (v, -v % P) for y, v in zip(ints(r), ints(x), strict=True))


@given(st.integers(1, 2**130))
def test_exponent_digits_spell_the_exponent(e):
    digits, signed = field._exponent_digits(e)
    value = 0
    for d in digits:
        value = 2 * value + {0: 0, 1: 1, 2: -1}[d]
    assert value == e and digits[0] == 1 and (signed or 2 not in digits)


def test_power_rejects_bad_exponents():
    with pytest.raises(FieldError):
        field.power(rand(2), -1)
    with pytest.raises(TypeError):
        field.power(rand(2), 2.0)


# ---------------------------------------------------------------- properties


vectors = st.lists(elements, min_size=0, max_size=40)


@given(st.lists(st.tuples(elements, elements, elements), max_size=30))
def test_mul_associative_and_distributive(triples):
    a, b, c = (vec(col) for col in zip(*triples, strict=True)) if triples else (field.zeros(0),) * 3
    assert np.array_equal(field.mul(field.mul(a, b), c), field.mul(a, field.mul(b, c)))
    assert np.array_equal(field.mul(a, field.add(b, c)), field.add(field.mul(a, b), field.mul(a, c)))
    assert np.array_equal(field.sub(field.add(a, b), b), a)
    assert np.array_equal(field.add(a, field.neg(a)), field.zeros(len(triples)))


@given(st.lists(st.tuples(elements, elements), max_size=40))
def test_dot_is_total_of_products(pairs_):
    a = vec([x for x, _ in pairs_])
    b = vec([y for _, y in pairs_])
    assert np.array_equal(field.dot(a, b), field.total(field.mul(a, b)))
    assert ints(field.dot(a, b)) == sum(x * y for x, y in pairs_) % P


@given(st.lists(st.integers(-(2**130), 2**130), min_size=1, max_size=12), st.integers(1, 20))
def test_lincomb_is_sum_of_scales(coefs, n):
    vecs = [rand(n) for _ in coefs]
    expect = field.zeros(n)
    for c, v in zip(coefs, vecs, strict=True):
        expect = field.add(expect, field.scale(v, c))
    assert np.array_equal(field.lincomb(coefs, vecs), expect)


@given(st.lists(st.integers(-(2**200), 2**200), max_size=30))
def test_ints_round_trip(values):
    v = field.from_ints(values)
    assert ints(v) == [x % P for x in values]
    assert np.array_equal(v, field._from_objs(np.array(values, dtype=object)))


@given(st.lists(st.integers(-(P // 2), P // 2), max_size=30))
def test_signed_round_trip(values):
    assert field.to_signed(field.from_ints(values)) == values


@given(vectors, st.integers(0, 2**130))
def test_power_matches_pow(values, e):
    assert ints(field.power(vec(values), e)) == [pow(x, e, P) for x in values]


# ---------------------------------------------------------------- conversion and checks


def test_from_ints_int64_and_small_types():
    s = np.array([0, 1, -1, -(2**63), 2**63 - 1, -12345], dtype=np.int64)
    assert ints(field.from_ints(s)) == [int(x) % P for x in s]
    for dtype in (np.int8, np.int16, np.int32, np.uint8, np.uint16, np.uint32, np.uint64, np.bool_):
        info = np.iinfo(dtype) if dtype is not np.bool_ else None
        vals = [0, 1] if info is None else [info.min, info.max, 0, 1]
        arr = np.array(vals, dtype=dtype)
        assert ints(field.from_ints(arr)) == [int(x) % P for x in vals], dtype
    assert ints(field.from_ints(np.array([2**64 - 1, 2**63], dtype=np.uint64))) == [2**64 - 1, 2**63]
    m = np.arange(-6, 6, dtype=np.int64).reshape(3, 4)
    assert field.to_signed(field.from_ints(m)) == m.tolist()


def test_from_ints_lists_and_big_ints():
    values = [-1, 2**63, -(2**63), 2**64 - 1, 2**64, P, P + 1, -P, 2**300, -(2**300), True]
    assert ints(field.from_ints(values)) == [int(x) % P for x in values]
    assert ints(field.from_ints([-1, 2**63])) == [P - 1, 2**63]  # numpy would make these floats
    assert ints(field.from_ints(iter([5, -5]))) == [5, P - 5]
    assert field.from_ints([]).shape == (0, 2)
    assert ints(field.from_ints([[1, -2], [3, 2**100]])) == [[1, P - 2], [3, 2**100]]


def test_to_ints_and_signed_both_paths():
    small = vec([0, 1, 2**64 - 1])
    assert ints(small) == [0, 1, 2**64 - 1]
    borders = [0, 2**63 - 1, 2**63, P - 2**63, P - 2**63 - 1, P // 2, P // 2 + 1, P - 1, 2**64]
    expect = [x - P if x > P // 2 else x for x in borders]
    assert field.to_signed(vec(borders)) == expect
    for x, y in zip(borders, expect, strict=True):
        assert field.to_signed(vec([x])) == [y]
        assert field.to_signed(vec([x, 5, P - 5])) == [y, 5, -5]
    assert isinstance(field.to_signed(vec([P - 1]))[0], int)
    assert field.to_ints(field.from_int(9)) == 9


UNREDUCED = [[2**64 - 1, 2**63 - 1], [0, 2**63], [5, 2**64 - 1], [2**64 - 1, 2**64 - 1]]  # p, 2^127, ...


@pytest.mark.parametrize("limbs", UNREDUCED)
def test_check_and_from_bytes_reject_unreduced(path, limbs):
    good = rand(4, 3)
    bad = good.copy()
    bad[2, 1] = limbs
    with pytest.raises(FieldError):
        field.check(bad)
    with pytest.raises(FieldError):
        field.check(np.moveaxis(bad, 0, 1))
    with pytest.raises(FieldError):
        field.from_bytes(field.to_bytes(bad))
    assert np.array_equal(field.from_bytes(field.to_bytes(good), (4, 3)), good)


def test_from_bytes_lengths_and_shapes():
    data = field.to_bytes(rand(6))
    for n in (1, 15, 17, len(data) - 1):
        with pytest.raises(FieldError):
            field.from_bytes(data[:n])
    with pytest.raises(FieldError):
        field.from_bytes(data, (4,))
    assert field.from_bytes(data, (2, 3)).shape == (2, 3, 2)
    assert field.from_bytes(b"").shape == (0, 2)
    assert field.from_bytes(memoryview(bytearray(data))).flags.writeable


# ---------------------------------------------------------------- randomness


def test_random_is_reduced_and_uniform(path):
    from scipy import stats  # heavy import, only here

    v = field.random(200_000)
    assert np.array_equal(field.check(v), v)
    low = np.bincount((v[:, 0] & np.uint64(0xFF)).astype(np.intp), minlength=256)
    high = np.bincount((v[:, 1] >> np.uint64(55)).astype(np.intp), minlength=256)  # bits 119..126
    assert stats.chisquare(low).pvalue > 1e-6
    assert stats.chisquare(high).pvalue > 1e-6


def test_random_from_a_stream_is_its_bytes(path):
    """With an rng the elements are its keystream, little-endian, bit 127 cleared (reproducible)."""
    key = bytes(range(32))
    v = field.random((3, 5), AesCtrRandom(key))
    raw = bytearray(15 * 16)
    AesCtrRandom(key).fill(memoryview(raw), 0)
    expect = [int.from_bytes(raw[16 * i : 16 * i + 16], "little") & P for i in range(15)]
    assert ints(v.reshape(15, 2)) == [x % P for x in expect]
    rng = AesCtrRandom(key)
    assert not np.array_equal(field.random(4, rng), field.random(4, rng))  # reserve: never reused


def test_random_maps_p_to_zero(path):
    class AllOnes:
        def reserve(self, n):
            return 0

        def fill(self, out, position=0):
            out[:] = b"\xff" * len(out)

    assert np.array_equal(field.random(3, AllOnes()), field.zeros(3))


@pytest.mark.parametrize("bits", [0, 1, 8, 63, 64, 65, 100, 126])
def test_random_below(bits):
    v = field.random_below((50, 4), bits)
    assert all(x < 2**bits for row in ints(v) for x in row)
    with pytest.raises(FieldError):
        field.random_below(3, 127)


# ---------------------------------------------------------------- fallback


def test_jit_failure_falls_back_once(monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no JIT here")

    monkeypatch.setattr(_fieldsimd, "compile_kernels", broken)
    field._kernels.cache_clear()
    try:
        a, b = rand(5), rand(5)
        assert field.backend() == "reference"
        assert np.array_equal(field.mul(a, b), field._ref_mul(a, b))
        assert np.array_equal(field.inverse(a), field._ref_pow(a, P - 2))
        assert len(calls) == 1
    finally:
        field._kernels.cache_clear()


def test_numpy_setting_never_loads_llvmlite():
    code = (
        "import sys\n"
        "from qstore import field\n"
        "a = field.from_ints([3, -4])\n"
        "assert field.to_signed(field.mul(a, field.inverse(a))) == [1, 1]\n"
        "assert field.backend() == 'reference'\n"
        "assert 'llvmlite' not in sys.modules\n"
    )
    env = {**os.environ, "QSTORE_KERNEL": "numpy"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
