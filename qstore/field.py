"""The prime field F_p, p = 2^127 - 1, for secret-shared tables and MPC.

Why this prime: sums of products of 32-bit fixed-point values over 10^7
rows need about 2^88, statistical masking of comparisons another 2^40, and
signed values a factor 2, so a field of about 2^127 holds every
intermediate result exactly. p is a Mersenne prime (reduction is a shift
and an add) and p = 3 mod 4 (square roots are one exponentiation, which the
random-bit protocol needs).

A *field vector* is a numpy array of dtype uint64 and shape ``(..., 2)``:
element ``v[..., 0] + 2^64 * v[..., 1]``, always reduced (< p). That is
also its wire format (16 little-endian bytes per element), so messages need
no conversion. Leading dimensions are free: ``(rows,)`` columns,
``(bits, rows)`` bit matrices, and operations work elementwise over them.

Every operation here has a plain Python-integer twin (``_ref_*``) that the
tests compare against; the fast paths are vectorised kernels
(:mod:`qstore._fieldsimd` where available) — never a Python loop per element.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

P = (1 << 127) - 1
ELEM_BYTES = 16
_MASK64 = (1 << 64) - 1
_U64 = np.uint64

Vec = np.ndarray  # uint64, shape (..., 2), reduced


class FieldError(ValueError):
    """A value that is not a field vector, or bytes that do not hold one."""


# ---------------------------------------------------------------- conversion


def _objs(v: Vec) -> np.ndarray:
    """Field vector → object array of Python ints (reference path)."""
    lo = v[..., 0].astype(object)
    hi = v[..., 1].astype(object)
    return np.asarray((hi << 64) | lo, dtype=object)


def _from_objs(o: np.ndarray) -> Vec:
    """Object array of Python ints (any sign, any size) → reduced field vector."""
    o = np.asarray(np.asarray(o, dtype=object) % P, dtype=object)
    out = np.empty(o.shape + (2,), dtype=_U64)
    out[..., 0] = np.asarray(o & _MASK64, dtype=object).astype(_U64)
    out[..., 1] = np.asarray(o >> 64, dtype=object).astype(_U64)
    return out


def zeros(shape: int | tuple[int, ...]) -> Vec:
    """A vector of zeros."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return np.zeros(shape + (2,), dtype=_U64)


def from_ints(values: Iterable[int] | np.ndarray) -> Vec:
    """Integers of any sign → field elements (negative x becomes p - |x|).

    int64/int32/bool numpy arrays take a vectorised path; anything else goes
    through Python ints.
    """
    if isinstance(values, np.ndarray) and values.dtype.kind in "biu" and values.dtype.itemsize <= 8:
        a = values.astype(np.int64, copy=False)
        out = np.zeros(a.shape + (2,), dtype=_U64)
        neg = a < 0
        # -x mod p for 0 < x < 2^63: p - x = (2^64 - x) + (2^63 - 1) * 2^64 with the top bit clear
        out[..., 0] = a.astype(_U64)  # two's complement: 2^64 - x for negatives
        out[..., 0][neg] -= _U64(1)  # p = 2^127 - 1: subtract the missing 1
        out[..., 1][neg] = _U64((1 << 63) - 1)
        return out
    return _from_objs(np.array(list(values) if not isinstance(values, np.ndarray) else values, dtype=object))


def from_int(value: int, shape: int | tuple[int, ...] = ()) -> Vec:
    """One integer as a field vector of the given shape (every element equal)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    value %= P
    out = np.empty(shape + (2,), dtype=_U64)
    out[..., 0] = value & _MASK64
    out[..., 1] = value >> 64
    return out


def to_ints(v: Vec) -> list[Any]:
    """Field vector → (nested) list of Python ints in [0, p)."""
    return _objs(check(v)).tolist()


def to_signed(v: Vec) -> list[Any]:
    """Field vector → Python ints in (-p/2, p/2]: how signed results are read."""
    o = _objs(check(v))
    o = np.asarray(np.where(o > P // 2, o - P, o), dtype=object)
    return o.tolist()


def check(v: object) -> Vec:
    """``v`` if it is a field vector (uint64, last axis 2, reduced), else FieldError."""
    if not isinstance(v, np.ndarray) or v.dtype != _U64 or v.ndim < 1 or v.shape[-1] != 2:
        raise FieldError("not a field vector (uint64 array with last axis 2)")
    hi = v[..., 1]
    top = _U64((1 << 63) - 1)
    if hi.size and (int(hi.max()) >> 63 or bool(np.any((hi == top) & (v[..., 0] == _U64(_MASK64))))):
        raise FieldError("field element out of range")
    return v


def to_bytes(v: Vec) -> bytes:
    """Wire form: 16 little-endian bytes per element, in C order."""
    return np.ascontiguousarray(v, dtype="<u8").tobytes()


def from_bytes(data: bytes | bytearray | memoryview, shape: int | tuple[int, ...] | None = None) -> Vec:
    """Wire form → field vector; FieldError for a wrong length or an unreduced element."""
    if len(data) % ELEM_BYTES:
        raise FieldError(f"{len(data)} bytes is not a whole number of field elements")
    n = len(data) // ELEM_BYTES
    v = np.frombuffer(data, dtype="<u8").astype(_U64).reshape(n, 2)
    if shape is not None:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if int(np.prod(shape, dtype=np.int64)) != n:
            raise FieldError(f"{n} field elements do not fill shape {shape}")
        v = v.reshape(shape + (2,))
    return check(v)


# ---------------------------------------------------------------- arithmetic (reference paths)


def _ref_add(a: Vec, b: Vec) -> Vec:
    return _from_objs(_objs(a) + _objs(b))


def _ref_sub(a: Vec, b: Vec) -> Vec:
    return _from_objs(_objs(a) - _objs(b))


def _ref_mul(a: Vec, b: Vec) -> Vec:
    return _from_objs(_objs(a) * _objs(b))


def _ref_scale(a: Vec, c: int) -> Vec:
    return _from_objs(_objs(a) * (c % P))


def _ref_dot(a: Vec, b: Vec) -> Vec:
    return _from_objs(np.array((_objs(a) * _objs(b)).sum(axis=-1) % P, dtype=object))


def _ref_sum(a: Vec) -> Vec:
    return _from_objs(np.array(_objs(a).sum(axis=-1) % P, dtype=object))


def _ref_pow(a: Vec, e: int) -> Vec:
    o = _objs(a)
    return _from_objs(np.frompyfunc(lambda x: pow(int(x), e, P), 1, 1)(o))


def _ref_lincomb(coeffs: Sequence[int], vecs: Sequence[Vec]) -> Vec:
    acc = np.zeros(vecs[0].shape[:-1], dtype=object)
    for c, v in zip(coeffs, vecs, strict=True):
        acc = acc + _objs(v) * (c % P)
    return _from_objs(acc)


def _kernels() -> Any:
    return None  # replaced by qstore._fieldsimd when it is available


def add(a: Vec, b: Vec) -> Vec:
    """a + b elementwise (shapes must match)."""
    return _ref_add(a, b)


def sub(a: Vec, b: Vec) -> Vec:
    """a - b elementwise."""
    return _ref_sub(a, b)


def neg(a: Vec) -> Vec:
    """-a elementwise."""
    return _ref_sub(zeros(a.shape[:-1]), a)


def mul(a: Vec, b: Vec) -> Vec:
    """a * b elementwise."""
    return _ref_mul(a, b)


def scale(a: Vec, c: int) -> Vec:
    """c * a for a public integer c (any sign)."""
    return _ref_scale(a, c)


def add_const(a: Vec, c: int) -> Vec:
    """a + c for a public integer c (any sign)."""
    return _ref_add(a, from_int(c, a.shape[:-1]))


def dot(a: Vec, b: Vec) -> Vec:
    """Sum over the last element axis of a * b: shape (..., N, 2) → (..., 2)."""
    return _ref_dot(a, b)


def total(a: Vec) -> Vec:
    """Sum over the last element axis: shape (..., N, 2) → (..., 2)."""
    return _ref_sum(a)


def lincomb(coeffs: Sequence[int], vecs: Sequence[Vec]) -> Vec:
    """Σ coeffs[i] * vecs[i] for public integer coefficients (Lagrange recombination, evaluation)."""
    if not vecs:
        raise FieldError("lincomb of no vectors")
    return _ref_lincomb(coeffs, vecs)


def power(a: Vec, e: int) -> Vec:
    """a ** e elementwise for a public exponent e ≥ 0."""
    if e < 0:
        raise FieldError("negative exponent")
    return _ref_pow(a, e)


def inverse(a: Vec) -> Vec:
    """a^-1 elementwise (0 maps to 0: callers check for zeros where it matters)."""
    return power(a, P - 2)


def sqrt(a: Vec) -> Vec:
    """A square root of each quadratic residue (p = 3 mod 4: a^((p+1)/4)); garbage for non-residues."""
    return power(a, (P + 1) // 4)


def random(shape: int | tuple[int, ...], rng: Any = None) -> Vec:
    """Uniform field elements (127 random bits each, p itself mapped to 0: bias 2^-127).

    ``rng``: a :class:`qstore.rng.RandomSource` (its ``reserve``/``fill``), default the OS.
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    n = int(np.prod(shape, dtype=np.int64))
    buf = bytearray(n * ELEM_BYTES)
    if n:
        if rng is None:
            buf[:] = os.urandom(len(buf))
        else:
            rng.fill(memoryview(buf), rng.reserve(len(buf)))
    v = np.frombuffer(buf, dtype="<u8").astype(_U64).reshape(shape + (2,))
    v[..., 1] &= _U64((1 << 63) - 1)
    top = (v[..., 1] == _U64((1 << 63) - 1)) & (v[..., 0] == _U64(_MASK64))
    v[top] = 0
    return v


def random_below(shape: int | tuple[int, ...], bits: int, rng: Any = None) -> Vec:
    """Uniform integers in [0, 2^bits), bits ≤ 126, as field elements (statistical masks)."""
    if not 0 <= bits <= 126:
        raise FieldError("bits must be in 0..126")
    v = random(shape, rng)
    if bits <= 64:
        v[..., 1] = 0
        if bits < 64:
            v[..., 0] &= _U64((1 << bits) - 1)
    else:
        v[..., 1] &= _U64((1 << (bits - 64)) - 1)
    return v
