"""MPC protocols on Shamir-shared field vectors: opening, products, randomness, comparison.

Every function here is an engine protocol (a generator, see
:mod:`qstore.mpc.engine`): call it with ``yield from`` and pass the same
public arguments on every party. Inputs and outputs are this party's shares
(degree t unless said otherwise), vectors of any leading shape; all work is
vectorised over them (Python loops run only over bit positions and rounds).
Linear operations need no protocol: add shares with :mod:`qstore.field`,
multiply them by public values, add public constants.

What is revealed. Semi-honest parties, at most t of them curious, n ≥ 2t+1.
Only :func:`open_` / :func:`open_2t` (and :func:`open_many`) reveal their
argument, by definition. Every other protocol opens only values that are
independent of the data (r², in :func:`random_bits`) or statistically masked
with KAPPA = 40 extra random bits (the comparisons, :func:`mod2m`,
:func:`bit_decompose`): what any t parties see is then within statistical
distance about 2^-40 per opened element of a distribution that does not
depend on the inputs.

Costs, per element of the vectors:

* a *multiplication* (one degree reduction) is one round; 2t+1 dealers each
  send one field element to each other party: (2t+1)(n-1) elements of traffic.
* an *opening* is one round, n(n-1) elements; a *deal* (joint randomness) is
  one round, (t+1)(n-1) elements.

With R(m) = ceil(log2 m), the round counts are: open/reduce/mul/random: 1;
random_bits and :func:`masks`: 2; ltz, lt, eq, mod2m, trunc, bit_decompose:
1 + R(bits) with masks prepared beforehand (``pre=``), 3 + R(bits) without;
order_statistics: 2 + B·(3 + R(c)) - 1 (B value bits, c comparison bits).
Joint randomness, random bits and masks depend on no input: a program that
knows its comparisons in advance prepares all their :class:`Masks` in one
batch (2 rounds in all).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from qstore import field
from qstore.errors import LocalError
from qstore.field import P, Vec
from qstore.mpc import shamir
from qstore.mpc.engine import Context, Exchange, Protocol, ProtocolError, expect

__all__ = [
    "KAPPA",
    "Masks",
    "bit_decompose",
    "eq",
    "eqc",
    "eqz",
    "ge",
    "gec",
    "gt",
    "gtc",
    "if_else",
    "inner",
    "le",
    "lec",
    "lt",
    "ltc",
    "ltz",
    "masks",
    "max_condition",
    "mod2m",
    "mul",
    "mul_many",
    "ne",
    "open_",
    "open_2t",
    "open_many",
    "order_statistics",
    "prefix_mul",
    "prefix_or",
    "quantile_conditions",
    "random",
    "random_below",
    "random_bits",
    "rank_condition",
    "reduce",
    "reduce_many",
    "trunc",
]

KAPPA = 40  # statistical security parameter of every masked opening
MASK_LIMIT = 1 << 126  # masked values stay below this (and so below p: no wrap-around)
_INV2 = (P + 1) // 2
_EXP_INV_SQRT = (P - 3) // 4  # v^((p-3)/4) = ±1/sqrt(v) for a square v (p = 3 mod 4)


# ---------------------------------------------------------------- small pure-numpy helpers


def _shape(v: Vec) -> tuple[int, ...]:
    return v.shape[:-1]


def _bcast(v: Vec, shape: tuple[int, ...]) -> Vec:
    """v broadcast to element shape ``shape`` (a contiguous copy)."""
    return np.ascontiguousarray(np.broadcast_to(v, shape + (2,)))


def _ones(shape: tuple[int, ...]) -> Vec:
    return field.from_int(1, shape)


def _one_minus(v: Vec) -> Vec:
    return field.sub(_ones(_shape(v)), v)


def _select(cond: np.ndarray, a: Vec, b: Vec) -> Vec:
    """Elementwise a where the public boolean ``cond`` holds, else b."""
    return np.where(np.asarray(cond, dtype=bool)[..., None], a, b)


def _sum(vecs: Sequence[Vec]) -> Vec:
    return field.lincomb([1] * len(vecs), vecs)


def _is_zero(v: Vec) -> np.ndarray:
    return (v[..., 0] == 0) & (v[..., 1] == 0)


def _low_bits(v: Vec, m: int) -> np.ndarray:
    """Bits 0..m-1 of public field elements as uint8, shape (m,) + element shape (LSB first)."""
    i = np.arange(m, dtype=np.uint64).reshape((m,) + (1,) * (v.ndim - 1))
    sh = i % np.uint64(64)
    bits = np.where(i < 64, v[..., 0][None] >> sh, v[..., 1][None] >> sh) & np.uint64(1)
    return bits.astype(np.uint8)


def _mod_pow2(v: Vec, m: int) -> Vec:
    """Public field elements (as integers in [0, p)) reduced mod 2^m, m ≤ 126."""
    out = v.copy()
    if m < 64:
        out[..., 0] &= np.uint64((1 << m) - 1)
        out[..., 1] = 0
    else:
        out[..., 1] &= np.uint64((1 << (m - 64)) - 1)
    return out


def _rounds(m: int) -> int:
    """R(m) = ceil(log2 m): the depth of a log-depth tree over m items."""
    return max(m - 1, 0).bit_length()


def _check_bits(bits: int, low: int = 1) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not low <= bits <= 125:
        raise LocalError(f"bit length must be an integer in {low}..125")


# ---------------------------------------------------------------- opening


def _open(ctx: Context, vecs: Sequence[Vec], degree: int) -> Protocol[list[Vec]]:
    vecs = list(vecs)
    inbox = yield Exchange.broadcast(ctx, vecs)
    inbox = expect(ctx, inbox, [_shape(v) for v in vecs])
    out = []
    for i, mine in enumerate(vecs):
        shares = {ctx.me: mine} | {peer: got[i] for peer, got in inbox.items()}
        if not shamir.consistent(shares, degree):
            raise ProtocolError(f"the shares opened do not lie on one polynomial of degree {degree}")
        xs = sorted(shares)[: degree + 1]
        out.append(shamir.reconstruct({x: shares[x] for x in xs}))
    return out


def open_many(ctx: Context, vecs: Sequence[Vec]) -> Protocol[list[Vec]]:
    """Open several degree-t sharings in one round (see :func:`open_`)."""
    return (yield from _open(ctx, vecs, ctx.t))


def open_(ctx: Context, a: Vec) -> Protocol[Vec]:
    """Every party learns the value of the degree-t sharing ``a``.

    Reveals a. 1 round; every party sends its share to every other one. With
    more than t+1 parties the shares are checked to lie on one polynomial of
    degree t (ProtocolError if not): a corrupted share is detected, not corrected.
    """
    return (yield from _open(ctx, [a], ctx.t))[0]


def open_2t(ctx: Context, c: Vec) -> Protocol[Vec]:
    """Open a degree-2t sharing: reveals c, 1 round.

    Hazmat: opening reveals the whole sharing polynomial, not only its value.
    A bare local product of two degree-t sharings is a product of two
    polynomials, and its factors (hence the factors' secrets) can be
    recovered from it: add a fresh random degree-2t sharing of zero first
    (as :mod:`qstore.mpc.join` does), or reduce instead. Needs all of at
    least 2t+1 parties; with more, consistency at degree 2t is checked.
    """
    return (yield from _open(ctx, [c], 2 * ctx.t))[0]


# ---------------------------------------------------------------- degree reduction and products


def reduce_many(ctx: Context, cs: Sequence[Vec]) -> Protocol[list[Vec]]:
    """Degree-t sharings of the values of degree-2t sharings ``cs``, all in one round.

    The first 2t+1 parties reshare their shares with degree t; everyone
    recombines the shares it got with the Lagrange coefficients of those
    parties at 0. Reveals nothing (each resharing is a fresh degree-t sharing).
    """
    cs = list(cs)
    dealers = ctx.parties[: 2 * ctx.t + 1]
    got = yield from _deal_each(ctx, [_shape(c) for c in cs], lambda: cs, dealers=dealers)
    coeffs = shamir.lagrange(dealers)
    return [field.lincomb(coeffs, [g[i] for g in got]) for i in range(len(cs))]


def reduce(ctx: Context, c: Vec) -> Protocol[Vec]:
    """Degree-t sharing of the value of the degree-2t sharing c: 1 round, reveals nothing."""
    return (yield from reduce_many(ctx, [c]))[0]


def mul(ctx: Context, a: Vec, b: Vec) -> Protocol[Vec]:
    """Shares of a·b elementwise: the local product (degree 2t), reduced. 1 round, 1 mult per element."""
    return (yield from reduce_many(ctx, [field.mul(a, b)]))[0]


def mul_many(ctx: Context, pairs: Sequence[tuple[Vec, Vec]]) -> Protocol[list[Vec]]:
    """Several products of different shapes in one round."""
    return (yield from reduce_many(ctx, [field.mul(a, b) for a, b in pairs]))


def inner(ctx: Context, a: Vec, b: Vec) -> Protocol[Vec]:
    """Shares of Σ a·b over the last element axis ((..., N) → (...)): one reduction however long N is.

    1 round; the traffic is that of one mult per output element.
    """
    return (yield from reduce_many(ctx, [field.dot(a, b)]))[0]


def if_else(ctx: Context, c: Vec, x: Vec, y: Vec) -> Protocol[Vec]:
    """x where the shared bit c is 1, else y: y + c·(x - y). c broadcasts to x's shape. 1 round."""
    d = field.sub(x, y)
    return field.add(y, (yield from mul(ctx, _bcast(c, _shape(d)), d)))


# ---------------------------------------------------------------- joint randomness


def _deal(
    ctx: Context, shapes: Sequence[tuple[int, ...]], draw: Callable[[], list[Vec]]
) -> Protocol[list[Vec]]:
    """The first t+1 parties each share values of their own drawing; everyone sums. 1 round.

    Any t parties miss at least one dealer's contribution, so a sum of
    uniform field elements is uniform to them.
    """
    got = yield from _deal_each(ctx, shapes, draw)
    return [_sum([g[i] for g in got]) for i in range(len(shapes))]


def _deal_each(
    ctx: Context, shapes: Sequence[tuple[int, ...]], draw: Callable[[], list[Vec]],
    dealers: Sequence[int] | None = None,
) -> Protocol[list[list[Vec]]]:
    """Each dealer (default: the first t+1 parties) shares values of its own with degree t; every
    dealer's sharings, in the dealers' order. 1 round."""
    dealers = ctx.parties[: ctx.t + 1] if dealers is None else tuple(dealers)
    shapes = [tuple(s) for s in shapes]
    own: list[Vec] = []
    if ctx.me in dealers:
        dealt = [shamir.share(v, ctx.parties, ctx.t, ctx.rng) for v in draw()]
        own = [d[ctx.me] for d in dealt]
        ex = Exchange.send_all(ctx, lambda peer: [d[peer] for d in dealt])
    else:
        ex = Exchange.send_all(ctx, lambda peer: [])
    inbox = yield ex
    inbox = expect(ctx, inbox, lambda peer: shapes if peer in dealers else [])
    return [own if d == ctx.me else inbox[d] for d in dealers]


def random(ctx: Context, shape: int | tuple[int, ...]) -> Protocol[Vec]:
    """Shares of uniform field elements nobody knows. 1 round, reveals nothing."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return (yield from _deal(ctx, [shape], lambda: [field.random(shape, ctx.rng)]))[0]


def random_below(ctx: Context, shape: int | tuple[int, ...], bits: int) -> Protocol[Vec]:
    """Shares of statistical masks: the sum of t+1 dealt uniform integers in [0, 2^bits).

    The result lies in [0, (t+1)·2^bits) ⊂ [0, n·2^bits) and is not uniform,
    but any t parties miss one uniform summand, which is what masking needs.
    1 round, reveals nothing.
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    _check_bits(bits, 0)
    return (yield from _deal(ctx, [shape], lambda: [field.random_below(shape, bits, ctx.rng)]))[0]


def bit_rounds(t: int) -> int:
    """Rounds of :func:`random_bits` (and :func:`masks`): one to deal, then an XOR tree over t+1 dealers."""
    return 1 + _rounds(t + 1)


def random_bits(ctx: Context, shape: int | tuple[int, ...]) -> Protocol[Vec]:
    """Shares of uniform random bits nobody knows. 1 + R(t+1) rounds, reveals nothing.

    Each of the first t+1 parties deals shares of its own random bits and the
    bits are XORed (x ⊕ y = x + y − 2xy) in a tree: any t parties miss one
    dealer's bit, so the XOR is uniform to them. Much cheaper than the
    squaring method (open r² and take a square root: an exponentiation per bit, and
    the opened product polynomial must first be re-randomised, see :func:`open_2t`).
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return (yield from _xor_bits(ctx, shape, []))[0]


def _xor_bits(ctx: Context, shape: tuple[int, ...],
              extra: Sequence[tuple[tuple[int, ...], Callable[[], Vec]]]
              ) -> Protocol[list[Vec]]:
    """Random bits of ``shape`` (dealt and XORed) and, dealt in the same round, the ``extra`` sums."""
    def draw() -> list[Vec]:
        count = int(np.prod(shape, dtype=np.int64))
        raw = np.frombuffer(_random_bytes(ctx, -(-count // 8)), dtype=np.uint8)
        bits = np.unpackbits(raw)[:count].astype(np.int64)
        return [field.from_ints(bits.reshape(shape))] + [make() for _, make in extra]

    got = yield from _deal_each(ctx, [shape] + [s for s, _ in extra], draw)
    level = [g[0] for g in got]
    while len(level) > 1:
        pairs = [(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        prods = yield from mul_many(ctx, pairs)
        nxt = [field.sub(field.add(a, b), field.scale(ab, 2))
               for (a, b), ab in zip(pairs, prods, strict=True)]
        level = nxt + ([level[-1]] if len(level) % 2 else [])
    return [level[0]] + [_sum([g[i + 1] for g in got]) for i in range(len(extra))]


def _random_bytes(ctx: Context, n: int) -> bytes:
    buf = bytearray(n)
    if n:
        if ctx.rng is None:
            buf[:] = os.urandom(n)
        else:
            ctx.rng.fill(memoryview(buf), ctx.rng.reserve(n))
    return bytes(buf)


@dataclass(frozen=True)
class Masks:
    """Input-independent randomness for one batch of masked openings.

    ``bits``: shares of m uniform bits per element, shape (m,) + element shape,
    least significant first; ``high``: shares of the high mask (t+1 dealt
    integers in [0, 2^high_bits) summed), element shape. Use each once.
    """

    bits: Vec
    high: Vec
    high_bits: int

    @property
    def m(self) -> int:
        return self.bits.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return _shape(self.high)

    def take(self, index: int | slice | tuple[int | slice, ...]) -> Masks:
        """The masks of the elements ``high[index]`` (indexing the element shape)."""
        bits, high = self.bits[:, index], self.high[index]
        return Masks(np.ascontiguousarray(bits), np.ascontiguousarray(high), self.high_bits)


def masks(ctx: Context, shape: int | tuple[int, ...], m: int, high_bits: int) -> Protocol[Masks]:
    """Prepare :class:`Masks` for ``shape`` elements: m random bits each and a high mask. 2 rounds.

    What each protocol needs: ltz/lt/le/eqz/eq... on ``bits``: (bits, KAPPA + 1);
    mod2m/trunc(bits, m): (m, bits + 1 - m + KAPPA); bit_decompose(bits): (bits, KAPPA).
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    _check_bits(m)
    _check_bits(high_bits)
    bits, high = yield from _xor_bits(
        ctx, (m,) + shape, [(shape, lambda: field.random_below(shape, high_bits, ctx.rng))]
    )
    return Masks(bits, high, high_bits)


# ---------------------------------------------------------------- masked opening and bitwise circuits


def _masked_open(
    ctx: Context, z: Vec, z_bits: int, m: int, pre: Masks | None
) -> Protocol[tuple[Vec, Vec, Vec]]:
    """Open c = z + 2^m·r' + r for z in [0, 2^z_bits): (c, shares of r's m bits, shares of r).

    r = Σ 2^i r_i is uniform in [0, 2^m), r' a high mask of z_bits - m + KAPPA
    bits: c mod 2^m is uniform, and c's high part hides z >> m statistically.
    1 round (+2 to prepare the masks when ``pre`` is None).
    """
    shape = _shape(z)
    need = z_bits - m + KAPPA
    high_bits = need if pre is None else pre.high_bits
    if (1 << z_bits) + (1 << m) * (ctx.t + 1) * (1 << high_bits) >= MASK_LIMIT:
        raise LocalError(
            f"{z_bits}-bit values with {KAPPA}-bit masks from {ctx.t + 1} dealers do not fit the field"
        )
    if pre is None:
        pre = yield from masks(ctx, shape, m, need)
    elif pre.m != m or pre.shape != shape or pre.high_bits < need:
        raise LocalError(f"masks for {m} bits of shape {shape} with ≥ {need} high bits expected")
    r = field.lincomb([1 << i for i in range(m)], list(pre.bits))
    c = field.add(field.add(z, field.scale(pre.high, 1 << m)), r)
    return (yield from open_(ctx, c)), pre.bits, r


def prefix_mul(ctx: Context, x: Vec) -> Protocol[Vec]:
    """Prefix products along axis 0: out[i] = x[0]·x[1]···x[i].

    Sklansky's log-depth network: R(len) rounds, (len/2)·R(len) mults per
    element of the trailing shape. Reveals nothing.
    """
    x = np.array(x, copy=True, order="C")
    m = x.shape[0]
    idx = np.arange(m)
    k = 0
    while (1 << k) < m:
        tg = idx[(idx >> k) & 1 == 1]
        src = ((tg >> k) << k) - 1
        x[tg] = yield from mul(ctx, x[tg], x[src])
        k += 1
    return x


def prefix_or(ctx: Context, x: Vec) -> Protocol[Vec]:
    """Prefix ORs of shared bits along axis 0: out[i] = x[0] ∨ ... ∨ x[i] (cost of :func:`prefix_mul`).

    For ORs from the most significant bit of an LSB-first decomposition, flip axis 0 before and after.
    """
    return _one_minus((yield from prefix_mul(ctx, _one_minus(x))))


def _product(ctx: Context, x: Vec) -> Protocol[Vec]:
    """Π x[i] along axis 0 by a balanced tree: R(len) rounds, len - 1 mults per element."""
    while x.shape[0] > 1:
        h = x.shape[0] // 2
        prod = yield from mul(ctx, x[:h], x[h : 2 * h])
        x = np.concatenate([prod, x[2 * h :]])
    return x[0]


def _bits_lt(ctx: Context, c_bits: np.ndarray, r_bits: Vec) -> Protocol[Vec]:
    """Shares of [c < r] for public bits c and shared bits r, both (m,) + shape, LSB first.

    c < r iff r is 1 at the most significant position where they differ. With
    g_i = 1 - (c_i xor r_i) (linear, c public) and suffix products
    S_i = Π_{j ≥ i} g_j, that position is where S_{i+1} - S_i = 1, and there
    r_i = 1 - c_i: [c < r] = Σ_i (S_{i+1} - S_i)(1 - c_i), linear in S.
    R(m) rounds.
    """
    g = _select(c_bits == 1, r_bits, _one_minus(r_bits))
    s = np.ascontiguousarray((yield from prefix_mul(ctx, g[::-1]))[::-1])
    s_next = np.concatenate([s[1:], _ones((1,) + _shape(s)[1:])])
    d = _select(c_bits == 0, field.sub(s_next, s), field.zeros(_shape(s)))
    return field.total(np.ascontiguousarray(np.moveaxis(d, 0, -2)))


# ---------------------------------------------------------------- comparison and friends


def mod2m(ctx: Context, a: Vec, bits: int, m: int, pre: Masks | None = None) -> Protocol[Vec]:
    """Shares of a mod 2^m (in [0, 2^m)) for a signed a in [-2^bits, 2^bits), 1 ≤ m ≤ bits.

    Catrina and de Hoogh's protocol: with z = a + 2^bits ≥ 0 and a masked
    opening c = z + 2^m·r' + r, z mod 2^m = (c mod 2^m) - r + 2^m·[c mod 2^m < r],
    the last term by a bitwise comparison. Reveals only c (statistically masked).
    Rounds: 1 + R(m) (+2 without ``pre``, which must be ``masks(ctx, shape, m,
    bits + 1 - m + KAPPA)``); mults per element: (m/2)·R(m), plus m random bits.
    """
    _check_bits(bits)
    if not isinstance(m, int) or not 1 <= m <= bits:
        raise LocalError("need 1 ≤ m ≤ bits")
    z = field.add_const(a, 1 << bits)
    c, r_bits, r = yield from _masked_open(ctx, z, bits + 1, m, pre)
    u = yield from _bits_lt(ctx, _low_bits(c, m), r_bits)
    return field.add(field.sub(_mod_pow2(c, m), r), field.scale(u, 1 << m))


def trunc(ctx: Context, a: Vec, bits: int, m: int, pre: Masks | None = None) -> Protocol[Vec]:
    """Shares of floor(a / 2^m) for a signed a in [-2^bits, 2^bits) (fixed-point truncation).

    Exact (not probabilistic): (a - a mod 2^m)·2^-m. Costs and reveals as :func:`mod2m`.
    """
    low = yield from mod2m(ctx, a, bits, m, pre)
    return field.scale(field.sub(a, low), pow(2, -m, P))


def ltz(ctx: Context, a: Vec, bits: int, pre: Masks | None = None) -> Protocol[Vec]:
    """Shares of [a < 0] for a signed a in [-2^bits, 2^bits) (as a field element: p - |a| if negative).

    [a < 0] = -floor(a / 2^bits). Reveals only a value masked with KAPPA
    extra bits; needs bits + KAPPA + log2(t+1) + 2 < 126 (LocalError otherwise).
    Rounds 1 + R(bits) with ``pre = masks(ctx, shape, bits, KAPPA + 1)``, else
    3 + R(bits); mults per element (bits/2)·R(bits), plus ``bits`` random bits.
    """
    low = yield from mod2m(ctx, a, bits, bits, pre)
    return field.scale(field.sub(low, a), pow(2, -bits, P))


def eqz(ctx: Context, a: Vec, bits: int, pre: Masks | None = None) -> Protocol[Vec]:
    """Shares of [a = 0] for a signed a with |a| < 2^bits.

    z = a + 2^bits is 0 mod 2^bits only for a = 0; after the masked opening
    c = z + 2^bits·r' + r that means c mod 2^bits = r, i.e. every bit equal:
    a product of ``bits`` shared bits (a tree). Reveals only the masked c.
    Rounds 1 + R(bits) with ``pre = masks(ctx, shape, bits, KAPPA + 1)`` (the
    same as ltz's), else 3 + R(bits); bits - 1 mults per element.
    """
    _check_bits(bits)
    z = field.add_const(a, 1 << bits)
    c, r_bits, _ = yield from _masked_open(ctx, z, bits + 1, bits, pre)
    same = _select(_low_bits(c, bits) == 1, r_bits, _one_minus(r_bits))
    return (yield from _product(ctx, same))


def lt(ctx: Context, a: Vec, b: Vec, bits: int, pre: Masks | None = None) -> Protocol[Vec]:
    """[a < b] for |a - b| < 2^bits (e.g. a, b in [0, 2^bits)); as :func:`ltz`."""
    return (yield from ltz(ctx, field.sub(a, b), bits, pre))


def le(ctx: Context, a: Vec, b: Vec, bits: int, pre: Masks | None = None) -> Protocol[Vec]:
    """[a ≤ b] = 1 - [b < a]; as :func:`ltz`."""
    return _one_minus((yield from ltz(ctx, field.sub(b, a), bits, pre)))


def gt(ctx: Context, a: Vec, b: Vec, bits: int, pre: Masks | None = None) -> Protocol[Vec]:
    """[a > b] = [b < a]; as :func:`ltz`."""
    return (yield from ltz(ctx, field.sub(b, a), bits, pre))


def ge(ctx: Context, a: Vec, b: Vec, bits: int, pre: Masks | None = None) -> Protocol[Vec]:
    """[a ≥ b] = 1 - [a < b]; as :func:`ltz`."""
    return _one_minus((yield from ltz(ctx, field.sub(a, b), bits, pre)))


def eq(ctx: Context, a: Vec, b: Vec, bits: int, pre: Masks | None = None) -> Protocol[Vec]:
    """[a = b] for |a - b| < 2^bits; as :func:`eqz`."""
    return (yield from eqz(ctx, field.sub(a, b), bits, pre))


def ne(ctx: Context, a: Vec, b: Vec, bits: int, pre: Masks | None = None) -> Protocol[Vec]:
    """[a ≠ b] = 1 - [a = b]; as :func:`eqz`."""
    return _one_minus((yield from eqz(ctx, field.sub(a, b), bits, pre)))


def ltc(ctx: Context, a: Vec, c: int, bits: int, pre: Masks | None = None) -> Protocol[Vec]:
    """[a < c] for a public integer c, |a - c| < 2^bits; as :func:`ltz`."""
    return (yield from ltz(ctx, field.add_const(a, -c), bits, pre))


def lec(ctx: Context, a: Vec, c: int, bits: int, pre: Masks | None = None) -> Protocol[Vec]:
    """[a ≤ c] = 1 - [c < a]; as :func:`ltz`."""
    return _one_minus((yield from ltz(ctx, field.add_const(field.neg(a), c), bits, pre)))


def gtc(ctx: Context, a: Vec, c: int, bits: int, pre: Masks | None = None) -> Protocol[Vec]:
    """[a > c] = [c < a]; as :func:`ltz`."""
    return (yield from ltz(ctx, field.add_const(field.neg(a), c), bits, pre))


def gec(ctx: Context, a: Vec, c: int, bits: int, pre: Masks | None = None) -> Protocol[Vec]:
    """[a ≥ c] = 1 - [a < c]; as :func:`ltz`."""
    return _one_minus((yield from ltz(ctx, field.add_const(a, -c), bits, pre)))


def eqc(ctx: Context, a: Vec, c: int, bits: int, pre: Masks | None = None) -> Protocol[Vec]:
    """[a = c] for a public integer c, |a - c| < 2^bits; as :func:`eqz`."""
    return (yield from eqz(ctx, field.add_const(a, -c), bits, pre))


def bit_decompose(ctx: Context, a: Vec, bits: int, pre: Masks | None = None) -> Protocol[Vec]:
    """Shares of the bits of a in [0, 2^bits): shape (bits,) + a's shape, least significant first.

    Masked opening c = a + 2^bits·r' + r, then a = (c - r) mod 2^bits by a
    binary subtraction of the shared bits of r from the public bits of c,
    computed as c + ~r + 1 with a log-depth (Sklansky) carry lookahead; each
    sum bit is linear in the carries (x + y + carry_in = sum + 2·carry_out).
    Reveals only the masked c. Rounds 1 + R(bits) with
    ``pre = masks(ctx, shape, bits, KAPPA)`` (ltz's masks do too), else
    3 + R(bits); at most bits·R(bits) mults per element, plus ``bits`` random bits.
    a must lie in [0, 2^bits): offset signed values first (a larger a would come
    out mod 2^bits, but its high part is then only statistically hidden for one bit).
    """
    _check_bits(bits)
    c, r_bits, _ = yield from _masked_open(ctx, a, bits, bits, pre)
    cb = _low_bits(c, bits) == 1
    s = _one_minus(r_bits)  # ~r
    g = _select(cb, s, field.zeros(_shape(s)))  # generate: c_i ∧ s_i
    p = _select(cb, r_bits, s)  # propagate: c_i ⊕ s_i
    big_g = g.copy()
    big_g[0] = field.add(g[0], p[0])  # the carry into bit 0 is 1
    big_p = p.copy()
    idx = np.arange(bits)
    k = 0
    while (1 << k) < bits:
        tg = idx[(idx >> k) & 1 == 1]
        src = ((tg >> k) << k) - 1
        if (2 << k) < bits:  # the propagate products are needed by later levels only
            pg, pp = yield from mul_many(ctx, [(big_p[tg], big_g[src]), (big_p[tg], big_p[src])])
            big_p[tg] = pp
        else:
            pg = yield from mul(ctx, big_p[tg], big_g[src])
        big_g[tg] = field.add(big_g[tg], pg)
        k += 1
    carry_in = np.concatenate([_ones((1,) + _shape(a)), big_g[:-1]])
    total = field.add(field.add(field.from_ints(cb.astype(np.uint8)), s), carry_in)
    return field.sub(total, field.scale(big_g, 2))


# ---------------------------------------------------------------- order statistics


def rank_condition(k: int) -> tuple[int, int, int]:
    """Condition for the k-th smallest value (1-based, public k): L ≤ k - 1."""
    return (1, 0, -k)


def max_condition() -> tuple[int, int, int]:
    """Condition for the largest value (the n-th smallest, n secret): L - n < 0."""
    return (1, -1, 0)


def quantile_conditions(a: int, b: int) -> list[tuple[int, int, int]]:
    """Conditions for the two order statistics numpy's linear quantile q = a/b interpolates.

    With h = (n-1)·q: k1 = floor(h) + 1 (b·L - (n-1)·a - 1 < 0) and
    k2 = ceil(h) + 1 (b·(L-1) - (n-1)·a < 0); the quantile is
    x_(k1) + frac(h)·(x_(k2) - x_(k1)), frac(h) = ((n-1)·a mod b)/b.
    """
    if not (isinstance(a, int) and isinstance(b, int) and 0 <= a <= b and b >= 1):
        raise LocalError("quantile a/b needs integers 0 ≤ a ≤ b, b ≥ 1")
    return [(b, -a, a - 1), (b, -a, a - b)]


def order_statistics(
    ctx: Context,
    xbits: Vec,
    mask: Vec,
    conditions: Sequence[tuple[int, int, int]],
    pre: Masks | None = None,
) -> Protocol[Vec]:
    """Order statistics of the rows selected by ``mask``, every decision kept secret.

    ``xbits``: shares of the bits of N values in [0, 2^B), shape (B, N), LSB
    first (from :func:`bit_decompose`); ``mask``: shares of 0/1 of shape
    (..., N) (leading axes: groups); ``conditions``: K triples (α, β, γ). For
    each group and condition the result is the largest v in [0, 2^B) with
    α·L(v) + β·n + γ < 0 where L(v) = #{i : mask_i = 1, x_i < v} and
    n = Σ mask; for the k-th smallest that is L(v) ≤ k - 1 (see
    :func:`rank_condition`, :func:`max_condition`, :func:`quantile_conditions`).
    Returns shares of shape (..., K).

    v is found bit by bit from the most significant: with eq_i = [x_i agrees
    with v on the bits decided so far] (eq = mask at first) and SL = the count of
    rows already below v, setting the next bit b to 1 keeps
    L = SL + Σ eq_i·(1 - x_ib) rows below; its secret decision m_b = ltz(α·L + β·n + γ)
    updates SL += m_b·Σ eq_i(1 - x_ib) and eq_i = [x_ib = m_b]·eq_i.
    Nothing is opened but the masked values inside ltz. If no row is selected
    (n = 0) the result is meaningless: suppress it.

    Rounds: 2 (masks, or ``pre = masks(ctx, (B,) + shape + (K,), c, KAPPA + 1)``
    with c = bit_length(max (|α| + |β|)·N + |γ|)) + B·(3 + R(c)) - 1.
    Mults: 2·B·K per row and group, plus B·(c/2)·R(c) per group and condition.
    Memory: a few vectors of shape (..., K, N).
    """
    if xbits.ndim != 3 or mask.ndim < 2 or mask.shape[-2] != xbits.shape[1]:
        raise LocalError("xbits must have shape (B, N) and mask shape (..., N)")
    nbits, rows = xbits.shape[0], xbits.shape[1]
    if not conditions:
        raise LocalError("at least one condition")
    groups = _shape(mask)[:-1]
    shape_k = groups + (len(conditions),)
    shape_kn = shape_k + (rows,)
    cbits = max(1, *(((abs(al) + abs(be)) * rows + abs(ga)).bit_length() for al, be, ga in conditions))
    if pre is None:
        pre = yield from masks(ctx, (nbits,) + shape_k, cbits, KAPPA + 1)
    alpha, beta, gamma = (
        _bcast(field.from_ints(list(col)), shape_k) for col in zip(*conditions, strict=True)
    )
    n = _bcast(field.total(mask)[..., None, :], shape_k)
    offset = field.add(field.mul(n, beta), gamma)  # β·n + γ, public coefficients
    eqs = _bcast(mask[..., None, :, :], shape_kn)
    below = field.zeros(shape_k)
    value = field.zeros(shape_k)
    for b in reversed(range(nbits)):
        hit = yield from mul(ctx, eqs, _bcast(xbits[b], shape_kn))  # agree so far and x_b = 1
        rest = field.sub(eqs, hit)  # agree so far and x_b = 0: below v if v_b = 1
        count = field.total(rest)
        cand = field.add(below, count)
        m = yield from ltz(ctx, field.add(field.mul(cand, alpha), offset), cbits, pre.take(b))
        value = field.add(value, field.scale(m, 1 << b))
        if b:
            flip, m_count = yield from mul_many(
                ctx, [(_bcast(m[..., None, :], shape_kn), field.sub(field.scale(hit, 2), eqs)), (m, count)]
            )
            eqs = field.add(rest, flip)  # m = 1: hit, m = 0: rest
            below = field.add(below, m_count)
    return value
