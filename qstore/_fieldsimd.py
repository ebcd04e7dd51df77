"""Machine-code kernels for F_p, p = 2^127 - 1, generated as LLVM IR.

An element is one ``i128`` (the two little-endian uint64 limbs of a field
vector, loaded as one integer). Reduction uses the Mersenne identities
2^127 = 1 and so 2^128 = 2 (mod p):

* a product: with a = a0 + 2^64 a1 and d = b0 2^64 + 2 b1 (= 2^64 b mod p),
  a * b = a0 * b + a1 * d (mod p), two 64 x 128-bit products each below
  2^191 (a1, b1 < 2^63): four 64 x 64 -> 128-bit multiplications, three
  when squaring, summed to w < 2^192;
* w mod p: one fold ``(w & p) + (w >> 127)`` leaves s < 2^127 + 2^65 < 2p,
  and one branch-free conditional subtraction ``(s + ((s + 1) >> 127)) & p``
  makes it canonical.

Sums of products (``dot``, ``lincomb``) and ``total`` add the unreduced
terms (each below 2^192) in one i256 accumulator: fewer than 2^63 terms
(numpy's limit) stay below 2^255, so nothing can overflow, and each output
is reduced once (two folds, then the subtraction). ``lincomb`` with
coefficients of at most 64 bits and a sign (Shamir evaluation at small x,
Lagrange coefficients of consecutive x) takes half the multiplications.
``power`` runs the square-and-multiply loop inside the kernel on several
elements at once (independent dependency chains keep the multiplier busy);
``inverse`` is Montgomery's batch inversion (three multiplications per
element and one exponentiation per lane).

Every kernel accepts inputs below 2^127 (so the unreduced zero p too) and
writes canonical results (< p); bit 127 set gives unspecified output.
Nothing here is target-specific: LLVM lowers the i128/i256 arithmetic to
``mul``/``adc`` (``mulx`` where the CPU has BMI2). The IR is compiled once
per process for the host CPU with llvmlite, all kernels in one module, and
called through ctypes, which releases the GIL.

Hazmat: the functions take raw addresses and trust the lengths;
:mod:`qstore.field` is the checked wrapper.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from dataclasses import dataclass

P = (1 << 127) - 1  # the field's prime, as in qstore.field (which imports this module lazily)
LANES = 4  # elements in flight in power and inverse
UNROLLED = 8  # lincomb of up to this many vectors has a kernel of its own

_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p
_PROTOS = {
    "binary": ctypes.CFUNCTYPE(None, _ptr, _ptr, _ptr, _i64),  # (a, b or &c, out, n)
    "unary": ctypes.CFUNCTYPE(None, _ptr, _ptr, _i64),  # (a, out, n)
    "dot": ctypes.CFUNCTYPE(None, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64),  # (a, b, out, rows, n, as, bs)
    "total": ctypes.CFUNCTYPE(None, _ptr, _ptr, _i64, _i64),  # (a, out, rows, n)
    "lincomb": ctypes.CFUNCTYPE(None, _ptr, _ptr, _i64, _ptr, _i64),  # (ptrs, coefs, k, out, n)
    "power": ctypes.CFUNCTYPE(None, _ptr, _ptr, _ptr, _i64, _ptr, _i64),  # (a, 1/a, out, n, digits, ndigits)
    "inverse": ctypes.CFUNCTYPE(None, _ptr, _ptr, _i64, _ptr, _i64),  # (a, out, n, bits, nbits)
    "check": ctypes.CFUNCTYPE(_i64, _ptr, _i64),  # (a, n) -> index of the first element >= p, or n
}
_ENGINES: list[object] = []  # compiled code lives as long as its engine


@dataclass(frozen=True)
class Kernels:
    """The compiled kernels; every array argument is a raw address of contiguous 16-byte elements.

    ``add``/``sub``/``mul(a, b, out, n)``; ``add_const``/``scale(a, c, out, n)`` with ``c`` the
    address of one element; ``neg``/``reduce(a, out, n)`` (``reduce`` clears bit 127 and maps p
    to 0, in place allowed); ``dot(a, b, out, rows, n, astride, bstride)``: row r of a starts at
    element ``r * astride`` (0 repeats one row); ``total(a, out, rows, n)``;
    ``lincomb(ptrs, coefs, k, out, n)``: ``ptrs`` k addresses, ``coefs`` 2k elements, each
    coefficient c followed by c0 2^64 + 2 c1 (congruent to 2^64 c); ``slincomb``: the same with
    each coefficient one element, magnitude < 2^64 (low limb) and sign (high limb, nonzero for
    negative); ``lincomb_k[k - 1]``/``slincomb_k[k - 1]``: for exactly k vectors;
    ``power(a, b, out, n, digits, ndigits)``: exponent digits as bytes, most significant first,
    ``digits[0]`` = 1, each 0, 1 or 2 for -1 (then b holds a^-1, else b may be a);
    ``inverse(a, out, n, bits, nbits)``: the bits of p - 2 as digits; ``check(a, n)``.
    """

    add: Callable[..., None]
    sub: Callable[..., None]
    mul: Callable[..., None]
    add_const: Callable[..., None]
    scale: Callable[..., None]
    neg: Callable[..., None]
    reduce: Callable[..., None]
    dot: Callable[..., None]
    total: Callable[..., None]
    lincomb: Callable[..., None]
    slincomb: Callable[..., None]
    lincomb_k: tuple[Callable[..., None], ...]  # lincomb_k[k - 1]: lincomb of exactly k vectors
    slincomb_k: tuple[Callable[..., None], ...]
    power: Callable[..., None]
    inverse: Callable[..., None]
    check: Callable[..., int]


# --- IR pieces -----------------------------------------------------------------


class _Emitter:
    """Lines of one function; ``e(rhs)`` emits ``%vN = rhs`` and returns ``%vN``."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._n = 0

    def __call__(self, rhs: str, name: str | None = None) -> str:
        if name is None:
            self._n += 1
            name = f"%v{self._n}"
        self._lines.append(f"  {name} = {rhs}\n")
        return name

    def line(self, text: str) -> None:
        self._lines.append(text + "\n")

    def label(self, name: str) -> None:
        self._lines.append(f"{name}:\n")

    def text(self) -> str:
        return "".join(self._lines)


def _load(e: _Emitter, base: str, i: str) -> str:
    addr = e(f"getelementptr i128, ptr {base}, i64 {i}")
    return e(f"load i128, ptr {addr}, align 8")


def _store(e: _Emitter, x: str, base: str, i: str) -> None:
    addr = e(f"getelementptr i128, ptr {base}, i64 {i}")
    e.line(f"  store i128 {x}, ptr {addr}, align 8")


def _canon(e: _Emitter, s: str, name: str | None = None) -> str:
    """s mod p for 0 <= s < 2p (branch-free: subtract p when s + 1 reaches 2^127)."""
    s1 = e(f"add i128 {s}, 1")
    t = e(f"lshr i128 {s1}, 127")
    u = e(f"add i128 {s}, {t}")
    return e(f"and i128 {u}, {P}", name)


def _canon128(e: _Emitter, s: str) -> str:
    """s mod p for any 128-bit s: one fold leaves at most p + 1."""
    return _canon(e, e(f"add i128 {e(f'and i128 {s}, {P}')}, {e(f'lshr i128 {s}, 127')}"))


def _add(e: _Emitter, a: str, b: str) -> str:
    return _canon128(e, e(f"add i128 {a}, {b}"))  # at most 2p (both p, the unreduced zero)


def _sub(e: _Emitter, a: str, b: str) -> str:
    nb = e(f"sub i128 {P}, {b}")  # 0 <= p - b <= p
    return _canon128(e, e(f"add i128 {a}, {nb}"))


def _neg(e: _Emitter, a: str) -> str:
    return _canon(e, e(f"sub i128 {P}, {a}"))


def _limbs(e: _Emitter, a: str) -> tuple[str, str]:
    lo = e(f"trunc i128 {a} to i64")
    hi = e(f"trunc i128 {e(f'lshr i128 {a}, 64')} to i64")
    return e(f"zext i64 {lo} to i128"), e(f"zext i64 {hi} to i128")


def _product(e: _Emitter, a: str, b: str) -> str:
    """An i256 w < 2^192 with w = a * b (mod p), for a, b < 2^127.

    With 2^128 = 2 (mod p), b * 2^64 = b0 2^64 + 2 b1 =: d, so
    a * b = a0 * b + a1 * d: each a 64 x 128-bit product below 2^191 (a1, b1
    < 2^63), from two 64 x 64 -> 128-bit multiplications; three when squaring.
    """
    a0, a1 = _limbs(e, a)
    square = b == a
    b0, b1 = (a0, a1) if square else _limbs(e, b)
    p = e(f"mul i128 {a0}, {b0}")
    q = e(f"mul i128 {a0}, {b1}")
    if square:
        r, s = e(f"shl i128 {e(f'mul i128 {a1}, {a1}')}, 1"), q
    else:
        r, s = e(f"mul i128 {a1}, {e(f'shl i128 {b1}, 1')}"), e(f"mul i128 {a1}, {b0}")
    return e(f"add i256 {_wide(e, p, q)}, {_wide(e, r, s)}")


def _wide(e: _Emitter, lo: str, hi: str) -> str:
    """lo + 2^64 hi as an i256, for 128-bit lo and hi < 2^127 (so the sum is below 2^192).

    Put together as ``low limb | (top << 64)``: one add of 128-bit values,
    and the pieces stay one 192-bit value for the sums that follow.
    """
    top = e(f"add i128 {hi}, {e(f'lshr i128 {lo}, 64')}")
    low = e(f"zext i64 {e(f'trunc i128 {lo} to i64')} to i256")
    high = e(f"shl i256 {e(f'zext i128 {top} to i256')}, 64")
    return e(f"or i256 {low}, {high}")


def _fold(e: _Emitter, x: str) -> str:
    """(x & p) + (x >> 127) in i256: congruent to x, and below 2^127 + 2^(bits(x) - 127)."""
    return e(f"add i256 {e(f'and i256 {x}, {P}')}, {e(f'lshr i256 {x}, 127')}")


def _reduce(e: _Emitter, x: str, wide: bool = False, name: str | None = None) -> str:
    """x mod p for an i256 x < 2^192 (one fold leaves < 2^127 + 2^65 <= 2p), or any x with ``wide``.

    Wide: the first fold leaves < 2^127 + 2^129, the second < 2^127 + 8.
    """
    s = _fold(e, x)
    if wide:
        s = _fold(e, s)
    return _canon(e, e(f"trunc i256 {s} to i128"), name)


def _mul(e: _Emitter, a: str, b: str, name: str | None = None) -> str:
    return _reduce(e, _product(e, a, b), name=name)


def _loop_head(e: _Emitter, label: str, prev: str, start: str, latch: str | None = None) -> str:
    """Open ``label``, index %<label>.i from ``start``; block ``latch`` closes it (:func:`_loop_tail`)."""
    e.label(label)
    return e(f"phi i64 [{start}, %{prev}], [%{label}.next, %{latch or label}]", f"%{label}.i")


def _loop_tail(e: _Emitter, label: str, end: str, after: str) -> None:
    e(f"add nuw nsw i64 %{label}.i, 1", f"%{label}.next")
    more = e(f"icmp slt i64 %{label}.next, {end}")
    e.line(f"  br i1 {more}, label %{label}, label %{after}")


def _guard(e: _Emitter, cond: str, then: str, other: str) -> None:
    e.line(f"  br i1 {cond}, label %{then}, label %{other}")


# --- kernels ----------------------------------------------------------------------


def _map_ir(name: str, op: Callable[..., str], arity: int, const: bool = False, alias: bool = False) -> str:
    """out[i] = op(a[i]) or op(a[i], b[i]) (``const``: op(a[i], c) with c = *b)."""
    e = _Emitter()
    na = "" if alias else " noalias"
    params = [f"ptr{na} %a"] + (["ptr noalias %b"] if arity == 2 else []) + [f"ptr{na} %out", "i64 %n"]
    e.line(f"define void @{name}({', '.join(params)}) {{")
    e.label("entry")
    c = e("load i128, ptr %b, align 8") if const else None
    _guard(e, e("icmp sgt i64 %n, 0"), "loop", "exit")
    i = _loop_head(e, "loop", "entry", "0")
    args = [_load(e, "%a", i)]
    if arity == 2:
        args.append(c if c is not None else _load(e, "%b", i))
    _store(e, op(e, *args), "%out", i)
    _loop_tail(e, "loop", "%n", "exit")
    e.label("exit")
    e.line("  ret void\n}")
    return e.text()


def _reduce127(e: _Emitter, a: str) -> str:
    return _canon(e, e(f"and i128 {a}, {P}"))


def _sums_ir(name: str, products: bool) -> str:
    """dot (products) or total: one output per row, summed exactly in i256 and reduced once.

    Each term is below 2^192 (a product, see :func:`_product`) or 2^127, and
    a row has fewer than 2^63 terms, so the sum stays below 2^255.
    """
    e = _Emitter()
    if products:
        e.line(f"define void @{name}(ptr noalias %a, ptr noalias %b, ptr noalias %out, i64 %rows, i64 %n, "
               "i64 %as, i64 %bs) {")
    else:
        e.line(f"define void @{name}(ptr noalias %a, ptr noalias %out, i64 %rows, i64 %n) {{")
    e.label("entry")
    e("icmp sgt i64 %n, 0", "%anyn")
    _guard(e, e("icmp sgt i64 %rows, 0"), "row", "exit")
    r = _loop_head(e, "row", "entry", "0", "rowend")
    stride = "%as" if products else "%n"
    ap = e(f"getelementptr i128, ptr %a, i64 {e(f'mul i64 {r}, {stride}')}")
    bp = e(f"getelementptr i128, ptr %b, i64 {e(f'mul i64 {r}, %bs')}") if products else ""
    _guard(e, "%anyn", "el", "rowend")
    i = _loop_head(e, "el", "row", "0")
    e("phi i256 [0, %row], [%acc.n, %el]", "%acc")
    x = _load(e, ap, i)
    term = _product(e, x, _load(e, bp, i)) if products else e(f"zext i128 {x} to i256")
    e(f"add i256 %acc, {term}", "%acc.n")
    _loop_tail(e, "el", "%n", "rowend")
    e.label("rowend")
    total = e("phi i256 [0, %row], [%acc.n, %el]")
    _store(e, _reduce(e, total, wide=True), "%out", r)
    _loop_tail(e, "row", "%rows", "exit")
    e.label("exit")
    e.line("  ret void\n}")
    return e.text()


def _coefficient(e: _Emitter, coefs: str, j: str, small: bool) -> tuple[str, ...]:
    """Coefficient j loaded as its term needs it.

    General: (c, d), two elements, d = c0 2^64 + 2 c1 (congruent to 2^64 c,
    precomputed so that the term needs no shift). Small: one element,
    magnitude (low limb) and sign (high limb nonzero for negative), returned
    as (sign mask p or 0, magnitude).
    """
    if not small:
        j2 = e(f"shl i64 {j}, 1")
        return _load(e, coefs, j2), _load(e, coefs, e(f"or i64 {j2}, 1"))
    c = _load(e, coefs, j)
    negative = e(f"icmp ne i128 {e(f'lshr i128 {c}, 64')}, 0")
    mask = e(f"select i1 {negative}, i128 {P}, i128 0")
    return mask, e(f"and i128 {c}, {(1 << 64) - 1}")


def _term(e: _Emitter, x: str, coef: tuple[str, str], small: bool) -> str:
    """An i256 below 2^192 congruent to c * x (see :func:`_product` and :func:`_coefficient`).

    Small: -|c| x = |c| (p - x), and p - x = p XOR x for x <= p; then |c| < 2^64
    makes it two 64 x 64-bit products.
    """
    x0, x1 = _limbs(e, x if not small else e(f"xor i128 {x}, {coef[0]}"))
    if small:
        return _wide(e, e(f"mul i128 {x0}, {coef[1]}"), e(f"mul i128 {x1}, {coef[1]}"))
    c0, c1 = _limbs(e, coef[0])
    d0, d1 = _limbs(e, coef[1])
    low = _wide(e, e(f"mul i128 {x0}, {c0}"), e(f"mul i128 {x0}, {c1}"))
    return e(f"add i256 {low}, {_wide(e, e(f'mul i128 {x1}, {d0}'), e(f'mul i128 {x1}, {d1}'))}")


def _lincomb_ir(k: int | None = None, small: bool = False) -> str:
    """out[i] = sum_j coefs[j] * ptrs[j][i], every vector read once, reduced once per element.

    ``k`` given: the kernel for exactly k vectors, unrolled, addresses and
    coefficients loaded once; else it loops over %k. ``small``: coefficients
    of at most 64 bits and a sign (:func:`_coefficient`), half the
    multiplications. Each term is below 2^192, so the sum stays below 2^256.
    """
    e = _Emitter()
    name = f"{'s' if small else ''}lincomb{k or ''}"
    e.line(f"define void @{name}(ptr noalias %ptrs, ptr noalias %coefs, i64 %k, ptr noalias %out, i64 %n) {{")
    e.label("entry")
    if k is not None:
        ptrs = [e(f"load ptr, ptr {e(f'getelementptr ptr, ptr %ptrs, i64 {j}')}, align 8") for j in range(k)]
        coefs = [_coefficient(e, "%coefs", str(j), small) for j in range(k)]
    _guard(e, e("icmp sgt i64 %n, 0"), "el", "exit")
    if k is not None:
        i = _loop_head(e, "el", "entry", "0")
        acc = "0"
        for vp, c in zip(ptrs, coefs, strict=True):
            acc = e(f"add i256 {acc}, {_term(e, _load(e, vp, i), c, small)}")
    else:
        i = _loop_head(e, "el", "entry", "0", "elend")
        e.line("  br label %vec")
        j = _loop_head(e, "vec", "el", "0")
        e("phi i256 [0, %el], [%acc.n, %vec]", "%acc")
        vp = e(f"load ptr, ptr {e(f'getelementptr ptr, ptr %ptrs, i64 {j}')}, align 8")
        coef = _coefficient(e, "%coefs", j, small)
        e(f"add i256 %acc, {_term(e, _load(e, vp, i), coef, small)}", "%acc.n")
        _loop_tail(e, "vec", "%k", "elend")
        e.label("elend")
        acc = "%acc.n"
    _store(e, _reduce(e, acc, wide=True), "%out", i)
    _loop_tail(e, "el", "%n", "exit")
    e.label("exit")
    e.line("  ret void\n}")
    return e.text()


def _pow_loop(e: _Emitter, xs: Sequence[str], sfx: str, cur: str,
              inverses: Sequence[str] | None = None) -> tuple[list[str], str]:
    """x ** e for each x in ``xs``, left to right over the digits %bits[1:%nbits]; closes block ``cur``.

    A digit is 0 (square), 1 (square, multiply by x) or, with ``inverses``
    (x^-1 for each x), 2 for -1 (square, multiply by x^-1): the non-adjacent
    form, which needs a third fewer multiplications than binary. Returns the
    results and the label of the (open) block where they are defined.
    """
    sq, mb, join, end = f"sq{sfx}", f"mb{sfx}", f"join{sfx}", f"pend{sfx}"
    _guard(e, e("icmp sgt i64 %nbits, 1"), sq, end)
    e.label(sq)
    bi = e(f"phi i64 [1, %{cur}], [%{join}.next, %{join}]", f"%{sq}.bi")
    cur_x = [e(f"phi i128 [{x}, %{cur}], [%{join}.x{j}, %{join}]") for j, x in enumerate(xs)]
    ys = [_mul(e, x, x) for x in cur_x]
    bit = e(f"load i8, ptr {e(f'getelementptr i8, ptr %bits, i64 {bi}')}, align 1")
    _guard(e, e(f"icmp ne i8 {bit}, 0"), mb, join)
    e.label(mb)
    if inverses is None:
        factors = list(xs)
    else:
        negative = e(f"icmp eq i8 {bit}, 2")
        factors = [e(f"select i1 {negative}, i128 {v}, i128 {x}") for x, v in zip(xs, inverses, strict=True)]
    zs = [_mul(e, y, f) for y, f in zip(ys, factors, strict=True)]
    e.line(f"  br label %{join}")
    e.label(join)
    for j, (y, z) in enumerate(zip(ys, zs, strict=True)):
        e(f"phi i128 [{y}, %{sq}], [{z}, %{mb}]", f"%{join}.x{j}")
    e(f"add nuw nsw i64 {bi}, 1", f"%{join}.next")
    _guard(e, e(f"icmp slt i64 %{join}.next, %nbits"), sq, end)
    e.label(end)
    outs = [e(f"phi i128 [{x}, %{cur}], [%{join}.x{j}, %{join}]") for j, x in enumerate(xs)]
    return outs, end


def _power_section(e: _Emitter, lanes: int, sfx: str, start: str, end: str, after: str) -> None:
    """out[i] = a[i] ** e for i in [start, end), ``lanes`` at a time (b[i] = a[i]^-1 for digits -1).

    The caller has branched to blk<sfx>.
    """
    blk = f"blk{sfx}"
    e.label(blk)
    g = e(f"phi i64 [{start}, %pre{sfx}], [%{blk}.next, %pend{sfx}]", f"%{blk}.i")
    idx = [e(f"add i64 {g}, {j}") for j in range(lanes)]
    xs = [_load(e, "%a", i) for i in idx]
    outs, _ = _pow_loop(e, xs, sfx, blk, [_load(e, "%b", i) for i in idx])
    for x, i in zip(outs, idx, strict=True):
        _store(e, _canon(e, x), "%out", i)
    e(f"add nuw nsw i64 {g}, {lanes}", f"%{blk}.next")
    _guard(e, e(f"icmp slt i64 %{blk}.next, {end}"), blk, after)


def _inverse_section(e: _Emitter, lanes: int, sfx: str, start: str, end: str, after: str) -> None:
    """Montgomery's trick over [start, end): lane j takes elements start + j, start + j + lanes, ...

    Forward: out[i] = product of the lane's nonzero elements up to i. One
    exponentiation per lane inverts its product; backward, each element's
    inverse is (inverse so far) * (prefix before it). Zeros (0 or p) stay 0.
    """
    f, inv, b = f"fwd{sfx}", f"inv{sfx}", f"bwd{sfx}"

    def nonzero(i: str) -> tuple[str, str]:
        x = _canon(e, _load(e, "%a", i))
        z = e(f"icmp eq i128 {x}, 0")
        return z, e(f"select i1 {z}, i128 1, i128 {x}")

    e.label(f)
    g = e(f"phi i64 [{start}, %pre{sfx}], [%{f}.next, %{f}]", f"%{f}.i")
    accs = [e(f"phi i128 [1, %pre{sfx}], [%{f}.acc{j}, %{f}]") for j in range(lanes)]
    for j in range(lanes):
        i = e(f"add i64 {g}, {j}")
        _, y = nonzero(i)
        acc = _mul(e, accs[j], y, f"%{f}.acc{j}")
        _store(e, acc, "%out", i)
    e(f"add nuw nsw i64 {g}, {lanes}", f"%{f}.next")
    _guard(e, e(f"icmp slt i64 %{f}.next, {end}"), f, inv)
    e.label(inv)
    invs, pend = _pow_loop(e, [f"%{f}.acc{j}" for j in range(lanes)], sfx, inv)
    last = e(f"sub i64 {end}, {lanes}")
    e.line(f"  br label %{b}")
    e.label(b)
    h = e(f"phi i64 [{last}, %{pend}], [%{b}.next, %{b}]", f"%{b}.i")
    ivs = [e(f"phi i128 [{v}, %{pend}], [%{b}.iv{j}, %{b}]") for j, v in enumerate(invs)]
    more = e(f"icmp sgt i64 {h}, {start}")
    for j in range(lanes):
        i = e(f"add i64 {h}, {j}")
        z, y = nonzero(i)
        before = e(f"select i1 {more}, i64 {e(f'sub i64 {i}, {lanes}')}, i64 {i}")  # in bounds either way
        prev = e(f"select i1 {more}, i128 {_load(e, '%out', before)}, i128 1")
        r = _mul(e, ivs[j], prev)
        _mul(e, ivs[j], y, f"%{b}.iv{j}")
        _store(e, e(f"select i1 {z}, i128 0, i128 {r}"), "%out", i)
    e(f"sub nsw i64 {h}, {lanes}", f"%{b}.next")
    _guard(e, more, b, after)


def _lanes_ir(name: str, section: Callable[..., None], lanes: int) -> str:
    """``section`` over [0, m) with ``lanes`` lanes and the n - m left over one at a time."""
    e = _Emitter()
    params = ["ptr noalias %a"] + (["ptr noalias %b"] if section is _power_section else [])
    params += ["ptr noalias %out", "i64 %n", "ptr noalias %bits", "i64 %nbits"]
    e.line(f"define void @{name}({', '.join(params)}) {{")
    e.label("entry")
    m = e(f"sub i64 %n, {e(f'urem i64 %n, {lanes}')}", "%m")
    _guard(e, e(f"icmp sgt i64 {m}, 0"), "preL", "tail")
    e.label("preL")
    e.line("  br label %" + ("blkL" if section is _power_section else "fwdL"))
    section(e, lanes, "L", "0", m, "tail")
    e.label("tail")
    _guard(e, e(f"icmp slt i64 {m}, %n"), "pre1", "exit")
    e.label("pre1")
    e.line("  br label %" + ("blk1" if section is _power_section else "fwd1"))
    section(e, 1, "1", m, "%n", "exit")
    e.label("exit")
    e.line("  ret void\n}")
    return e.text()


def _check_ir() -> str:
    e = _Emitter()
    e.line("define i64 @check(ptr noalias %a, i64 %n) {")
    e.label("entry")
    _guard(e, e("icmp sgt i64 %n, 0"), "loop", "done")
    e.label("loop")
    i = e("phi i64 [0, %entry], [%next, %cont]", "%i")
    _guard(e, e(f"icmp uge i128 {_load(e, '%a', i)}, {P}"), "found", "cont")
    e.label("cont")
    e("add nuw nsw i64 %i, 1", "%next")
    _guard(e, e("icmp slt i64 %next, %n"), "loop", "done")
    e.label("found")
    e.line("  ret i64 %i")
    e.label("done")
    e.line("  ret i64 %n\n}")
    return e.text()


def module_ir(lanes: int = LANES) -> str:
    """The IR of every kernel, one module."""
    return "\n".join([
        _map_ir("add", _add, 2),
        _map_ir("sub", _sub, 2),
        _map_ir("mul", _mul, 2),
        _map_ir("add_const", _add, 2, const=True),
        _map_ir("scale", _mul, 2, const=True),
        _map_ir("neg", _neg, 1),
        _map_ir("reduce", _reduce127, 1, alias=True),
        _sums_ir("dot", products=True),
        _sums_ir("total", products=False),
        *(_lincomb_ir(k, small) for small in (False, True) for k in (None, *range(1, UNROLLED + 1))),
        _lanes_ir("power", _power_section, lanes),
        _lanes_ir("inverse", _inverse_section, lanes),
        _check_ir(),
    ])


_SIGNATURES = {
    "add": "binary", "sub": "binary", "mul": "binary", "add_const": "binary", "scale": "binary",
    "neg": "unary", "reduce": "unary", "dot": "dot", "total": "total", "lincomb": "lincomb",
    "power": "power", "inverse": "inverse", "check": "check", "slincomb": "lincomb",
}


def compile_kernels(lanes: int = LANES) -> Kernels:
    """Compile every kernel for the host CPU (call once; :mod:`qstore.field` caches the result)."""
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    machine = llvm.Target.from_default_triple().create_target_machine(
        cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(), opt=3
    )
    module = llvm.parse_assembly(module_ir(lanes))
    module.triple = machine.triple
    module.data_layout = str(machine.target_data)
    module.verify()
    engine = llvm.create_mcjit_compiler(module, machine)
    engine.finalize_object()
    _ENGINES.append(engine)
    fns = {name: _PROTOS[sig](engine.get_function_address(name)) for name, sig in _SIGNATURES.items()}
    proto = _PROTOS["lincomb"]
    fixed = {
        f"{name}_k": tuple(proto(engine.get_function_address(f"{name}{k}")) for k in range(1, UNROLLED + 1))
        for name in ("lincomb", "slincomb")
    }
    return Kernels(**fns, **fixed)
