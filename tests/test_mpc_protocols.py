"""MPC protocols against plaintext numpy: 3 parties (t=1) and 5 parties (t=2), driven in memory."""

import numpy as np
import pytest
from scipy import stats as sps

from qstore import field
from qstore.errors import LocalError
from qstore.field import P
from qstore.mpc import protocols as pr
from qstore.mpc import shamir
from qstore.mpc.engine import Context, Exchange, ProtocolError, run_local

SETUPS = [(3, 1), (5, 2)]


def _parties(n):
    return tuple(range(1, n + 1))


def shares_of(n, t, secrets):
    vecs = [field.from_ints(np.array(np.asarray(s).tolist(), dtype=object)) for s in secrets]
    return [shamir.share(v, _parties(n), t) for v in vecs]


def run(n, t, fn, secrets, *public, views=None):
    """Share ``secrets`` (int arrays), run fn(ctx, *shares, *public) on every party; its result shares."""
    dealt = shares_of(n, t, secrets)
    progs = {
        x: fn(Context(me=x, parties=_parties(n), t=t), *[d[x] for d in dealt], *public) for x in _parties(n)
    }
    return run_local(progs, views=views)


def reveal(out, t):
    """Reconstruct degree-t result shares (checked consistent) as signed ints."""
    assert shamir.consistent(out, t)
    return np.array(field.to_signed(shamir.reconstruct(out)), dtype=object)


def mpc(n, t, fn, secrets, *public):
    views = {}
    out = run(n, t, fn, secrets, *public, views=views)
    return reveal(out, t), len(views[1])


def signed(rng, lo, hi, size):
    return rng.integers(lo, hi, size=size, endpoint=False)


# ---------------------------------------------------------------- opening and products


@pytest.mark.parametrize(("n", "t"), SETUPS)
def test_open_and_open_2t(n, t):
    rng = np.random.default_rng(n)
    a = signed(rng, -(10**9), 10**9, (3, 4))
    b = signed(rng, -(10**9), 10**9, (3, 4))

    def prog(ctx, sa, sb):
        x = yield from pr.open_(ctx, sa)
        y = yield from pr.open_2t(ctx, field.mul(sa, sb))
        z = yield from pr.open_many(ctx, [sb, field.zeros(0)])
        return x, y, z

    out = run(n, t, prog, [a, b])
    for x, y, z in out.values():
        assert field.to_signed(x) == a.tolist()
        assert field.to_signed(y) == (a.astype(object) * b).tolist()
        assert field.to_signed(z[0]) == b.tolist() and z[1].shape == (0, 2)


@pytest.mark.parametrize(("n", "t"), SETUPS)
def test_open_detects_an_inconsistent_share(n, t):
    a = np.arange(5)

    def prog(ctx, sa):
        if ctx.me == 2:
            sa = field.add_const(sa, 1)
        return (yield from pr.open_(ctx, sa))

    with pytest.raises(ProtocolError):
        run(n, t, prog, [a])


@pytest.mark.parametrize(("n", "t"), SETUPS)
def test_mul_inner_reduce_if_else(n, t):
    rng = np.random.default_rng(10 + n)
    a = signed(rng, -(2**40), 2**40, (2, 5)).astype(object)
    b = signed(rng, -(2**40), 2**40, (2, 5)).astype(object)
    c = rng.integers(0, 2, (2, 5))

    def prog(ctx, sa, sb, sc):
        m = yield from pr.mul(ctx, sa, sb)
        i = yield from pr.inner(ctx, sa, sb)
        r = yield from pr.reduce(ctx, field.mul(sa, sa))
        p, q = yield from pr.mul_many(ctx, [(sa, sb), (i, i)])
        s = yield from pr.if_else(ctx, sc, sa, sb)
        s1 = yield from pr.if_else(ctx, sc[:, :1], sa, sb)  # the bit broadcasts
        return m, i, r, p, q, s, s1

    views = {}
    out = run(n, t, prog, [a, b, c], views=views)
    assert len(views[1]) == 6
    got = [reveal({x: o[k] for x, o in out.items()}, t) for k in range(7)]
    inner = (a * b).sum(axis=-1)
    assert got[0].tolist() == (a * b).tolist()
    assert got[1].tolist() == inner.tolist()
    assert got[2].tolist() == (a * a).tolist()
    assert got[3].tolist() == (a * b).tolist()
    assert [v % P for v in got[4].tolist()] == [v * v % P for v in inner.tolist()]
    assert got[5].tolist() == np.where(c == 1, a, b).tolist()
    assert got[6].tolist() == np.where(c[:, :1] == 1, a, b).tolist()


@pytest.mark.parametrize(("n", "t"), SETUPS)
def test_products_of_empty_and_single_element_vectors(n, t):
    for shape in [(0,), (1,), ()]:
        a = np.full(shape, 7, dtype=np.int64)
        got, rounds = mpc(n, t, pr.mul, [a, a])
        assert got.tolist() == np.full(shape, 49).tolist() and rounds == 1


# ---------------------------------------------------------------- randomness


@pytest.mark.parametrize(("n", "t"), SETUPS)
def test_joint_randomness(n, t):
    def prog(ctx):
        r = yield from pr.random(ctx, (50,))
        s = yield from pr.random_below(ctx, (200,), 5)
        b = yield from pr.random_bits(ctx, (300,))
        return r, s, b

    views = {}
    out = run(n, t, prog, [], views=views)
    assert len(views[1]) == 2 + pr.bit_rounds(t)
    r, s, b = (reveal({x: o[k] for x, o in out.items()}, t) for k in range(3))
    r = [v % P for v in r.tolist()]
    assert len(set(r)) == 50  # 127-bit values do not collide
    s = s.tolist()
    assert all(0 <= v < (t + 1) * 32 for v in s) and max(s) > 32 // 2
    b = b.tolist()
    assert set(b) == {0, 1} and 90 < sum(b) < 210


# ---------------------------------------------------------------- comparison


def _edge_signed(bits, rng, extra=20):
    lim = 1 << bits
    edges = [-lim, -lim + 1, -1, 0, 1, lim - 1, lim // 2, -(lim // 2)]
    return np.array(edges + signed(rng, -lim, lim, extra).tolist(), dtype=np.int64)


@pytest.mark.parametrize(("n", "t"), SETUPS)
@pytest.mark.parametrize("bits", [1, 7, 16])
def test_ltz_mod2m_trunc(n, t, bits):
    rng = np.random.default_rng(bits * n)
    a = _edge_signed(bits, rng)
    got, rounds = mpc(n, t, pr.ltz, [a], bits)
    assert got.tolist() == (a < 0).astype(int).tolist()
    assert rounds == pr.bit_rounds(t) + 1 + pr._rounds(bits)
    for m in sorted({1, (bits + 1) // 2, bits}):
        got, _ = mpc(n, t, pr.mod2m, [a], bits, m)
        assert got.tolist() == (a % (1 << m)).tolist()
        got, _ = mpc(n, t, pr.trunc, [a], bits, m)
        assert got.tolist() == (a >> m).tolist()


@pytest.mark.parametrize(("n", "t"), SETUPS)
def test_comparisons_of_two_values_and_with_constants(n, t):
    bits = 6
    rng = np.random.default_rng(n)
    a = np.array([0, 63, 63, 0, 5, *rng.integers(0, 64, 15)])
    b = np.array([0, 63, 0, 63, 5, *rng.integers(0, 64, 15)])
    c = 17

    def prog(ctx, sa, sb):
        out = []
        for f in (pr.lt, pr.le, pr.gt, pr.ge, pr.eq, pr.ne):
            out.append((yield from f(ctx, sa, sb, bits)))
        for f in (pr.ltc, pr.lec, pr.gtc, pr.gec, pr.eqc):
            out.append((yield from f(ctx, sa, c, bits)))
        return out

    out = run(n, t, prog, [a, b])
    got = [reveal({x: o[k] for x, o in out.items()}, t).tolist() for k in range(11)]
    want = [a < b, a <= b, a > b, a >= b, a == b, a != b, a < c, a <= c, a > c, a >= c, a == c]
    for g, w in zip(got, want):
        assert g == w.astype(int).tolist()


@pytest.mark.parametrize(("n", "t"), SETUPS)
@pytest.mark.parametrize("bits", [1, 5, 12])
def test_eqz(n, t, bits):
    rng = np.random.default_rng(bits + n)
    lim = 1 << bits
    a = np.array([0, 1, -1, lim - 1, -lim + 1, 0, *signed(rng, -lim + 1, lim, 10)], dtype=np.int64)
    got, rounds = mpc(n, t, pr.eqz, [a], bits)
    assert got.tolist() == (a == 0).astype(int).tolist()
    assert rounds == pr.bit_rounds(t) + 1 + pr._rounds(bits)


@pytest.mark.parametrize(("n", "t"), SETUPS)
def test_comparisons_of_empty_and_single_element_vectors(n, t):
    for a in (np.zeros(0, dtype=np.int64), np.array([-3]), np.array(-3)):
        assert mpc(n, t, pr.ltz, [a], 4)[0].tolist() == (a < 0).astype(int).tolist()
        assert mpc(n, t, pr.eqz, [a], 4)[0].tolist() == (a == 0).astype(int).tolist()
        b = np.abs(a)
        got = mpc(n, t, pr.bit_decompose, [b], 4)[0]
        assert got.shape == (4,) + b.shape


@pytest.mark.parametrize(("n", "t"), SETUPS)
def test_prepared_masks_save_two_rounds(n, t):
    bits = 8
    a = np.array([[-200, 3, 0], [255, -255, -1]])

    def prog(ctx, sa):
        pre = yield from pr.masks(ctx, (2, 2, 3), bits, pr.KAPPA + 1)
        x = yield from pr.ltz(ctx, sa, bits, pre.take(0))
        y = yield from pr.eqz(ctx, sa, bits, pre.take(1))
        return x, y

    views = {}
    out = run(n, t, prog, [a], views=views)
    assert len(views[1]) == pr.bit_rounds(t) + 2 * (1 + pr._rounds(bits))
    assert reveal({x: o[0] for x, o in out.items()}, t).tolist() == (a < 0).astype(int).tolist()
    assert reveal({x: o[1] for x, o in out.items()}, t).tolist() == (a == 0).astype(int).tolist()


def test_parameters_are_checked():
    def prog(ctx, sa, f, *args):
        return (yield from f(ctx, sa, *args))

    with pytest.raises(LocalError):  # 100 bits + 40 bits of masking do not fit
        run(3, 1, prog, [np.array([1])], pr.ltz, 100)
    with pytest.raises(LocalError):
        run(3, 1, prog, [np.array([1])], pr.ltz, 0)
    with pytest.raises(LocalError):
        run(3, 1, prog, [np.array([1])], pr.mod2m, 8, 9)

    def wrong_masks(ctx, sa):
        pre = yield from pr.masks(ctx, (1,), 4, pr.KAPPA)
        return (yield from pr.ltz(ctx, sa, 4, pre))  # ltz needs KAPPA + 1 high bits

    with pytest.raises(LocalError):
        run(3, 1, wrong_masks, [np.array([1])])
    with pytest.raises(LocalError):
        pr.quantile_conditions(3, 2)


# ---------------------------------------------------------------- bits


@pytest.mark.parametrize(("n", "t"), SETUPS)
@pytest.mark.parametrize("bits", [1, 2, 5, 8, 13])
def test_bit_decompose(n, t, bits):
    rng = np.random.default_rng(bits * 7 + n)
    lim = 1 << bits
    a = np.array([0, lim - 1, 1, lim // 2, *rng.integers(0, lim, 12)], dtype=np.int64)
    got, rounds = mpc(n, t, pr.bit_decompose, [a], bits)
    want = (a[None, :] >> np.arange(bits)[:, None]) & 1
    assert got.tolist() == want.tolist()
    assert rounds == pr.bit_rounds(t) + 1 + pr._rounds(bits)


@pytest.mark.parametrize(("n", "t"), SETUPS)
def test_prefix_or_and_prefix_mul(n, t):
    rng = np.random.default_rng(n)
    for m in (1, 2, 3, 5, 8, 11):
        x = rng.integers(0, 2, (m, 4)) * rng.integers(0, 2, (m, 4))
        got, rounds = mpc(n, t, pr.prefix_or, [x])
        assert got.tolist() == np.maximum.accumulate(x, axis=0).tolist()
        assert rounds == pr._rounds(m)
        y = rng.integers(-5, 6, (m, 2))
        got, _ = mpc(n, t, pr.prefix_mul, [y])
        assert got.tolist() == np.cumprod(y.astype(object), axis=0).tolist()


# ---------------------------------------------------------------- order statistics


def _plain_order(x, mask, cond, nbits):
    """Reference: the largest v < 2^nbits with α·L(v) + β·n + γ < 0, bit by bit as in the protocol."""
    al, be, ga = cond
    sel = x[mask == 1]
    n = len(sel)
    v = 0
    for b in reversed(range(nbits)):
        cand = v | (1 << b)
        if al * int((sel < cand).sum()) + be * n + ga < 0:
            v = cand
    return v


@pytest.mark.parametrize(("n", "t"), SETUPS)
def test_order_statistics_match_numpy(n, t):
    rng = np.random.default_rng(100 + n)
    nbits = 5
    x = rng.integers(0, 1 << nbits, 13)
    x[:3] = [0, (1 << nbits) - 1, x[5]]  # the extremes and a tie
    masks = np.stack([rng.integers(0, 2, 13), np.ones(13, dtype=int), (np.arange(13) == 4).astype(int)])
    qs = [(1, 2), (1, 4), (3, 4), (0, 1), (1, 1), (1, 3)]
    conds = [pr.rank_condition(1), pr.max_condition(), pr.rank_condition(2)]
    for a, b in qs:
        conds += pr.quantile_conditions(a, b)
    xbits = (x[None, :] >> np.arange(nbits)[:, None]) & 1

    views = {}
    out = run(n, t, pr.order_statistics, [xbits, masks], conds, views=views)
    got = reveal(out, t)
    assert got.shape == (3, len(conds))
    cbits = max(((abs(al) + abs(be)) * 13 + abs(ga)).bit_length() for al, be, ga in conds)
    assert len(views[1]) == pr.bit_rounds(t) + nbits * (3 + pr._rounds(cbits)) - 1
    for g, mask in enumerate(masks):
        sel = np.sort(x[mask == 1])
        k = len(sel)
        assert got[g].tolist() == [_plain_order(x, mask, c, nbits) for c in conds]
        assert got[g][0] == sel[0] and got[g][1] == sel[-1]
        if k >= 2:
            assert got[g][2] == sel[1]
        for i, (a, b) in enumerate(qs):
            x1, x2 = got[g][3 + 2 * i], got[g][4 + 2 * i]
            frac = ((k - 1) * a % b) / b
            assert x1 + frac * (x2 - x1) == pytest.approx(np.quantile(sel, a / b))


@pytest.mark.parametrize(("n", "t"), [(3, 1)])
def test_order_statistics_small_inputs(n, t):
    conds = pr.quantile_conditions(1, 2)
    for x, mask in [(np.array([9]), np.array([1])), (np.array([3, 3]), np.array([1, 1]))]:
        xbits = (x[None, :] >> np.arange(4)[:, None]) & 1
        got, _ = mpc(n, t, pr.order_statistics, [xbits, mask], conds)
        assert got.tolist() == [int(np.median(x))] * 2


# ---------------------------------------------------------------- privacy


def _same_distribution(counts, alpha):
    """Two-sample chi-square on a 2 x bins table of counts (bins empty in both samples dropped)."""
    counts = counts[:, counts.sum(axis=0) > 0]
    return sps.chi2_contingency(counts).pvalue > alpha


def _elements(vecs):
    return np.concatenate([v.reshape(-1, 2) for v in vecs]) if vecs else np.zeros((0, 2), np.uint64)


def test_view_of_a_party_does_not_depend_on_the_input():
    """Party 1's view of ltz on all -100 vs all +100: opened values and every received element
    look the same (two-sample chi-square, alpha 1e-6 so that it never flakes)."""
    n, t, bits, size = 3, 1, 8, 768
    alpha = 1e-6
    received, opened = [], []
    for value in (-100, 100):
        views = {}
        out = run(n, t, pr.ltz, [np.full(size, value)], bits, views=views)
        assert set(reveal(out, t).tolist()) == {int(value < 0)}
        view = views[1]
        # every element received, low byte
        low = [_elements(vecs)[:, 0] & 0xFF for rnd in view for vecs in rnd.values()]
        received.append(np.concatenate(low).astype(np.int64))
        # the masked value c opened in round 2 (after deal and r²), rebuilt from the peers' shares
        c = shamir.reconstruct({peer: vecs[0] for peer, vecs in view[2].items()})
        opened.append(np.array(field.to_ints(c), dtype=object))
    for r in received:
        assert sps.chisquare(np.bincount(r, minlength=256)).pvalue > alpha
    table = np.stack([np.bincount(r, minlength=256) for r in received])
    assert _same_distribution(table, alpha)
    # c mod 2^8 is uniform; (c >> 8) hides the sign bit under a 41-bit mask: compare its low nibble
    for part in (lambda c: c % 256 // 16, lambda c: (c >> bits) % 16):
        counts = np.stack([np.bincount(part(c).astype(np.int64), minlength=16) for c in opened])
        for row in counts:
            assert sps.chisquare(row).pvalue > alpha
        assert _same_distribution(counts, alpha)
    # the statistic does see a difference where there is one: the unmasked sign bit
    leak = np.stack([np.bincount([int(v < 0)] * size, minlength=16) for v in (-100, 100)])
    assert not _same_distribution(leak, alpha)


def test_protocols_use_the_engine_only():
    # every protocol is a generator of Exchanges: nothing runs until it is driven
    ctx = Context(me=1, parties=(1, 2, 3), t=1)
    gen = pr.ltz(ctx, field.zeros(3), 4)
    step = next(gen)
    assert isinstance(step, Exchange) and set(step.out) == {2, 3}
    gen.close()
