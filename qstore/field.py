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
tests compare against; the fast paths are machine-code kernels
(:mod:`qstore._fieldsimd`, compiled on first use) — never a Python loop per
element. Without llvmlite, or with ``QSTORE_KERNEL=numpy``, the twins run
instead: exact, a hundred times slower (:func:`backend` tells which).
Arithmetic checks the shape and dtype of its inputs, not their range
(:func:`check` and :func:`from_bytes` do, at the boundaries); outputs are
new, reduced arrays.
"""

from __future__ import annotations

import ctypes
import operator
import os
import struct
from collections.abc import Iterable, Sequence
from functools import cache, lru_cache
from typing import Any

import numpy as np

P = (1 << 127) - 1
ELEM_BYTES = 16
_MASK64 = (1 << 64) - 1
_TOP = (1 << 63) - 1  # the high limb of p
_BUFFER = ctypes.c_char.from_buffer
_U64 = np.uint64

Vec = np.ndarray  # uint64, shape (..., 2), reduced


class FieldError(ValueError):
    """A value that is not a field vector, or bytes that do not hold one."""


# ---------------------------------------------------------------- conversion


def _shape(shape: int | tuple[int, ...]) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(shape)


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
    return np.zeros(_shape(shape) + (2,), dtype=_U64)


def _from_int_array(a: np.ndarray) -> Vec:
    """Integer (or bool) array of at most 64 bits → field elements, negative x as p - |x|."""
    out = np.empty(a.shape + (2,), dtype=_U64)
    if a.dtype.kind == "u" or a.dtype.kind == "b":
        out[..., 0] = a
        out[..., 1] = 0
        return out
    s = a.astype(np.int64, copy=False)
    neg = (s < 0).astype(_U64)
    # p - x for 0 < x <= 2^63: low limb 2^64 - x - 1 (two's complement minus one), high limb 2^63 - 1
    out[..., 0] = s.view(_U64) - neg
    out[..., 1] = neg * _U64(_TOP)
    return out


def from_ints(values: Iterable[int] | np.ndarray) -> Vec:
    """Integers of any sign → field elements (negative x becomes p - |x|).

    Integer and bool numpy arrays of up to 64 bits, and sequences whose
    values all fit in int64 or uint64, are converted without Python work
    per element; anything else goes through Python ints.
    """
    if not isinstance(values, np.ndarray):
        values = list(values)
        try:
            arr = np.asarray(values)
        except (OverflowError, ValueError):  # ragged, or too large for numpy's integer types
            arr = None
        if arr is not None and arr.dtype.kind in "biu" and arr.dtype.itemsize <= 8:
            return _from_int_array(arr)
        return _from_objs(np.array(values, dtype=object))
    if values.dtype.kind in "biu" and values.dtype.itemsize <= 8:
        return _from_int_array(values)
    return _from_objs(np.array(values, dtype=object))


def from_int(value: int, shape: int | tuple[int, ...] = ()) -> Vec:
    """One integer as a field vector of the given shape (every element equal)."""
    value %= P
    out = np.empty(_shape(shape) + (2,), dtype=_U64)
    out[..., 0] = value & _MASK64
    out[..., 1] = value >> 64
    return out


def to_ints(v: Vec) -> list[Any]:
    """Field vector → (nested) list of Python ints in [0, p)."""
    v = check(v)
    if not v[..., 1].any():  # every element below 2^64: numpy makes the ints
        return v[..., 0].tolist()
    return _objs(v).tolist()


def to_signed(v: Vec) -> list[Any]:
    """Field vector → Python ints in (-p/2, p/2]: how signed results are read."""
    v = check(v)
    lo, hi = v[..., 0], v[..., 1]
    small = (hi == 0) & (lo >> _U64(63) == 0)  # x < 2^63
    # x >= p - 2^63, read as x - p = lo + 1 - 2^64 (at least -2^63): the int64 bits of lo + 1
    negative = (hi == _U64(_TOP)) & (lo >= _U64(_TOP))
    fits = small | negative
    machine = np.where(small, lo, lo + _U64(1)).view(np.int64)
    if bool(fits.all()):
        return machine.tolist()
    out = machine.astype(object)  # Python ints; the elements beyond int64 follow
    big = _objs(v[~fits])
    out[~fits] = np.where(big > P // 2, big - P, big)
    return out.tolist()


def check(v: object) -> Vec:
    """``v`` if it is a field vector (uint64, last axis 2, reduced), else FieldError."""
    v = _structure(v)
    if v.size:
        k = _kernels()
        if k is not None:
            c = np.ascontiguousarray(v)
            if k.check(_addr(c), c.size // 2) != c.size // 2:
                raise FieldError("field element out of range")
            return v
        hi = v[..., 1]
        if int(hi.max()) >> 63 or bool(np.any((hi == _U64(_TOP)) & (v[..., 0] == _U64(_MASK64)))):
            raise FieldError("field element out of range")
    return v


def _structure(v: object) -> Vec:
    """``v`` if it is shaped like a field vector (its values unchecked), else FieldError."""
    if not isinstance(v, np.ndarray) or v.dtype != _U64 or v.ndim < 1 or v.shape[-1] != 2:
        raise FieldError("not a field vector (uint64 array with last axis 2)")
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
        shape = _shape(shape)
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


# ---------------------------------------------------------------- kernels


@cache
def _kernels() -> Any:  # -> qstore._fieldsimd.Kernels | None
    """The compiled kernels, or None: then every operation takes its reference path.

    Compiled on first use (about 0.2 s); ``QSTORE_KERNEL=numpy`` or a JIT
    failure (no llvmlite, no usable host target) selects the reference
    paths for the life of the process.
    """
    if os.environ.get("QSTORE_KERNEL", "").strip().lower() == "numpy":
        return None
    try:
        from qstore import _fieldsimd

        return _fieldsimd.compile_kernels()
    except Exception:  # any failure to build machine code leaves the (slow, exact) reference paths
        return None


def backend() -> str:
    """``"llvm"`` when the compiled kernels run here, else ``"reference"`` (Python integers)."""
    return "reference" if _kernels() is None else "llvm"


def _addr(a: np.ndarray) -> int:
    """Address of a C-contiguous, non-empty array (cheaper than ``a.ctypes.data`` where it is writable)."""
    try:
        return ctypes.addressof(_BUFFER(a))
    except TypeError:  # read-only memory (np.frombuffer of bytes)
        return a.ctypes.data


def _element(c: int) -> bytes:
    """One field element in memory form, for the kernels' constant arguments."""
    return (operator.index(c) % P).to_bytes(ELEM_BYTES, "little")


@lru_cache(maxsize=64)
def _exponent_bits(e: int) -> bytes:
    """The bits of e > 0, most significant first, one byte each (the power kernels' digits)."""
    return bytes(int(b) for b in bin(e)[2:])


@lru_cache(maxsize=64)
def _exponent_digits(e: int) -> tuple[bytes, bool]:
    """Digits of e > 0 for the power kernel, and whether they need a^-1.

    The non-adjacent form (digits 0, 1, -1 as 2; no two adjacent nonzero)
    when it saves more multiplications than the batch inverse costs: the
    inverse square root's (p - 3) / 4 = 2^125 - 1 takes one multiplication
    instead of 124. Else binary.
    """
    naf = []
    x = e
    while x:
        d = (2 - (x & 3)) if x & 1 else 0  # 1 when x = 1 (mod 4), -1 when x = 3 (mod 4)
        naf.append(d)
        x = (x - d) >> 1
    saved = (e.bit_count() - 1) - (sum(1 for d in naf if d) - 1)
    if saved < 8:
        return _exponent_bits(e), False
    return bytes(2 if d < 0 else d for d in reversed(naf)), True


def _map(name: str, a: Vec, second: Vec | bytes | None = None) -> Vec:
    """An elementwise kernel over a contiguous copy of ``a`` (and of a second vector, or a constant)."""
    a = np.ascontiguousarray(a)
    out = np.empty(a.shape, dtype=_U64)
    n = a.size // 2
    if n:
        args = [] if second is None else [second if isinstance(second, bytes) else _addr(second)]
        getattr(_kernels(), name)(_addr(a), *args, _addr(out), n)
    return out


def _binary(name: str, a: Vec, b: Vec) -> Vec:
    """a op b with numpy broadcasting; a single element on one side uses the constant kernels."""
    if a.shape != b.shape:
        shape = np.broadcast_shapes(a.shape, b.shape)
        with_const = {"add": "add_const", "mul": "scale", "sub": "add_const"}[name]
        if b.size == 2 and a.shape == shape:
            c = b.reshape(2)
            value = int(c[0]) | int(c[1]) << 64
            return _map(with_const, a, _element(-value if name == "sub" else value))
        if a.size == 2 and b.shape == shape and name != "sub":
            c = a.reshape(2)
            return _map(with_const, b, _element(int(c[0]) | int(c[1]) << 64))
        a, b = np.broadcast_to(a, shape), np.broadcast_to(b, shape)
    return _map(name, a, np.ascontiguousarray(b))


def add(a: Vec, b: Vec) -> Vec:
    """a + b elementwise (numpy broadcasting)."""
    a, b = _structure(a), _structure(b)
    return _ref_add(a, b) if _kernels() is None else _binary("add", a, b)


def sub(a: Vec, b: Vec) -> Vec:
    """a - b elementwise."""
    a, b = _structure(a), _structure(b)
    return _ref_sub(a, b) if _kernels() is None else _binary("sub", a, b)


def neg(a: Vec) -> Vec:
    """-a elementwise."""
    a = _structure(a)
    return _ref_sub(zeros(a.shape[:-1]), a) if _kernels() is None else _map("neg", a)


def mul(a: Vec, b: Vec) -> Vec:
    """a * b elementwise."""
    a, b = _structure(a), _structure(b)
    return _ref_mul(a, b) if _kernels() is None else _binary("mul", a, b)


def scale(a: Vec, c: int) -> Vec:
    """c * a for a public integer c (any sign)."""
    a = _structure(a)
    return _ref_scale(a, c) if _kernels() is None else _map("scale", a, _element(c))


def add_const(a: Vec, c: int) -> Vec:
    """a + c for a public integer c (any sign)."""
    a = _structure(a)
    if _kernels() is None:
        return _ref_add(a, from_int(c, a.shape[:-1]))
    return _map("add_const", a, _element(c))


def _rows(x: Vec, shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """x as contiguous rows of the broadcast element shape ``shape`` (..., N), and its row stride.

    One row broadcast over all others is not copied: its stride is 0.
    """
    n = shape[-1]
    if x.shape[:-1] == shape:
        return np.ascontiguousarray(x), n
    if x.shape[-2] == n and x.size == 2 * n:
        return np.ascontiguousarray(x.reshape(n, 2)), 0
    return np.ascontiguousarray(np.broadcast_to(x, shape + (2,))), n


def dot(a: Vec, b: Vec) -> Vec:
    """Sum over the last element axis of a * b: shape (..., N, 2) → (..., 2)."""
    a, b = _structure(a), _structure(b)
    if a.ndim < 2 or b.ndim < 2:
        raise FieldError("dot needs vectors with an element axis: shape (..., N, 2)")
    k = _kernels()
    if k is None:
        return _ref_dot(a, b)
    shape = np.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    ra, sa = _rows(a, shape)
    rb, sb = _rows(b, shape)
    out = np.empty(shape[:-1] + (2,), dtype=_U64)
    rows = out.size // 2
    if rows:
        n = shape[-1]
        k.dot(_addr(ra) if n else 0, _addr(rb) if n else 0, _addr(out), rows, n, sa, sb)
    return out


def total(a: Vec) -> Vec:
    """Sum over the last element axis: shape (..., N, 2) → (..., 2)."""
    a = _structure(a)
    if a.ndim < 2:
        raise FieldError("total needs vectors with an element axis: shape (..., N, 2)")
    k = _kernels()
    if k is None:
        return _ref_sum(a)
    a = np.ascontiguousarray(a)
    out = np.empty(a.shape[:-2] + (2,), dtype=_U64)
    rows = out.size // 2
    if rows:
        n = a.shape[-2]
        k.total(_addr(a) if n else 0, _addr(out), rows, n)
    return out


def lincomb(coeffs: Sequence[int], vecs: Sequence[Vec]) -> Vec:
    """Σ coeffs[i] * vecs[i] for public integer coefficients (Lagrange recombination, evaluation).

    One pass over memory: every vector is read once, each output element
    written once.
    """
    if len(vecs) == 0:
        raise FieldError("lincomb of no vectors")
    vecs = [_structure(v) for v in vecs]
    cs = [operator.index(c) % P for c in coeffs]
    if len(cs) != len(vecs):
        raise FieldError(f"{len(cs)} coefficients for {len(vecs)} vectors")
    k = _kernels()
    if k is None:
        return _ref_lincomb(cs, vecs)
    shape = vecs[0].shape
    if any(v.shape != shape for v in vecs):
        shape = np.broadcast_shapes(*(v.shape for v in vecs))
    terms = [(c, v) for c, v in zip(cs, vecs, strict=True) if c]
    if not terms:
        return np.zeros(shape, dtype=_U64)
    flat = [np.ascontiguousarray(v if v.shape == shape else np.broadcast_to(v, shape)) for _, v in terms]
    out = np.empty(shape, dtype=_U64)
    n = out.size // 2
    if n:
        m = len(terms)
        ptrs = struct.pack(f"<{m}Q", *(_addr(v) for v in flat))
        signed = [c if c <= _MASK64 else c - P for c, _ in terms]  # |c| < 2^64 with a sign where it fits
        if all(c >= -_MASK64 for c in signed):
            coefs = struct.pack(f"<{2 * m}Q", *(x for c in signed for x in (abs(c), c < 0)))
            fixed, loop = k.slincomb_k, k.slincomb
        else:
            coefs = struct.pack(f"<{4 * m}Q", *(x for c, _ in terms for x in _coefficient_pair(c)))
            fixed, loop = k.lincomb_k, k.lincomb
        (fixed[m - 1] if m <= len(fixed) else loop)(ptrs, coefs, m, _addr(out), n)
    return out


def _coefficient_pair(c: int) -> tuple[int, int, int, int]:
    """The limbs of c and of d = c0 2^64 + 2 c1 = 2^64 c (mod p), as the lincomb kernels take them."""
    c0, c1 = c & _MASK64, c >> 64
    return c0, c1, 2 * c1, c0


def _power(a: Vec, e: int) -> Vec:
    a = np.ascontiguousarray(a)
    out = np.empty(a.shape, dtype=_U64)
    n = a.size // 2
    if n:
        digits, signed = _exponent_digits(e)
        b = _inverse(a) if signed else a
        _kernels().power(_addr(a), _addr(b), _addr(out), n, digits, len(digits))
    return out


def _inverse(a: Vec) -> Vec:
    a = np.ascontiguousarray(a)
    out = np.empty(a.shape, dtype=_U64)
    n = a.size // 2
    if n:
        bits = _exponent_bits(P - 2)
        _kernels().inverse(_addr(a), _addr(out), n, bits, len(bits))
    return out


def power(a: Vec, e: int) -> Vec:
    """a ** e elementwise for a public exponent e ≥ 0 (0 ** 0 = 1)."""
    e = operator.index(e)
    if e < 0:
        raise FieldError("negative exponent")
    a = _structure(a)
    if _kernels() is None:
        return _ref_pow(a, e)
    if e == 0:
        return from_int(1, a.shape[:-1])
    if e >= P - 1:  # a^(p-1) = 1 for a != 0, and e stays >= 1 so that 0 ** e = 0
        e = (e - 1) % (P - 1) + 1
    return _power(a, e)


def inverse(a: Vec) -> Vec:
    """a^-1 elementwise (0 maps to 0: callers check for zeros where it matters).

    Montgomery's batch inversion: about three multiplications per element.
    """
    a = _structure(a)
    if _kernels() is None:
        return _ref_pow(a, P - 2)
    return _inverse(a)


def sqrt(a: Vec) -> Vec:
    """A square root of each quadratic residue (p = 3 mod 4: a^((p+1)/4)); garbage for non-residues."""
    return power(a, (P + 1) // 4)


def random(shape: int | tuple[int, ...], rng: Any = None) -> Vec:
    """Uniform field elements (127 random bits each, p itself mapped to 0: bias 2^-127).

    ``rng``: a :class:`qstore.rng.RandomSource` (its ``reserve``/``fill``), default the OS.
    """
    v = np.empty(_shape(shape) + (2,), dtype=_U64)
    if v.size:
        raw = v.reshape(-1).view(np.uint8)
        if rng is None:
            raw[:] = np.frombuffer(os.urandom(raw.size), dtype=np.uint8)
        else:
            rng.fill(memoryview(raw), rng.reserve(raw.size))
        k = _kernels()
        if k is not None:
            k.reduce(_addr(v), _addr(v), v.size // 2)
        else:
            v[..., 1] &= _U64(_TOP)
            top = (v[..., 1] == _U64(_TOP)) & (v[..., 0] == _U64(_MASK64))
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
