"""Secret shuffle and equi-join (qstore.mpc.join) against plaintext, driven in memory: n=3 t=1, n=5 t=2."""

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from qstore import field
from qstore import query as qmod
from qstore.errors import LocalError
from qstore.mpc import join, shamir, stats
from qstore.mpc.engine import Context, EngineError, run_local
from qstore.tables import Column, Schema, id_hash

SETUPS = [(3, 1), (5, 2)]


def _parties(n):
    return tuple(range(1, n + 1))


def _ctxs(n, t):
    return {x: Context(me=x, parties=_parties(n), t=t) for x in _parties(n)}


def _share(n, t, values):
    return shamir.share(field.from_ints(np.array(list(values), dtype=object)), _parties(n), t)


def _open(out, t):
    assert shamir.consistent(out, t)
    return field.to_signed(shamir.reconstruct(out))


# ---------------------------------------------------------------- shuffle


@pytest.mark.parametrize(("n", "t"), SETUPS)
def test_shuffle_is_a_secret_permutation_of_the_rows(n, t):
    rows = 12
    table = np.array([np.arange(rows) + 100 * c for c in range(3)])  # row i is (i, 100+i, 200+i)
    dealt = shamir.share(field.from_ints(table), _parties(n), t)
    orders = set()
    for _ in range(3):
        views = {}
        out = run_local({x: join.shuffle(c, dealt[x]) for x, c in _ctxs(n, t).items()}, views=views)
        assert len(views[1]) == 1 + math.comb(n, t + 1)
        got = np.array(_open(out, t))
        assert got.shape == (3, rows)
        assert sorted(got[0]) == list(range(rows))  # a permutation of the rows...
        assert (got[1] == got[0] + 100).all() and (got[2] == got[0] + 200).all()  # ...rows kept together
        assert not any(np.array_equal(out[x], dealt[x]) for x in out)  # fresh shares
        orders.add(tuple(got[0]))
    assert len(orders) == 3  # 12! orders: distinct runs give distinct permutations


def test_shuffle_many_uses_independent_permutations_and_handles_empty_tables():
    n, t = 3, 1
    a = shamir.share(field.from_ints(np.arange(20)[None]), _parties(n), t)
    b = shamir.share(field.from_ints(np.arange(20)[None]), _parties(n), t)
    e = shamir.share(field.zeros((2, 0)), _parties(n), t)
    out = run_local({x: join.shuffle_many(c, [a[x], b[x], e[x]]) for x, c in _ctxs(n, t).items()})
    ga = _open({x: o[0] for x, o in out.items()}, t)[0]
    gb = _open({x: o[1] for x, o in out.items()}, t)[0]
    assert sorted(ga) == sorted(gb) == list(range(20))
    assert ga != gb  # 1/20! to fail
    assert out[1][2].shape == (2, 0, 2)


def test_every_position_is_reached():
    """Over repeated shuffles of 4 rows, each row lands in each position (uniformity, coarsely)."""
    n, t, rows, runs = 3, 1, 4, 40
    dealt = shamir.share(field.from_ints(np.arange(rows)[None]), _parties(n), t)
    counts = np.zeros((rows, rows), dtype=int)
    for _ in range(runs):
        out = run_local({x: join.shuffle(c, dealt[x]) for x, c in _ctxs(n, t).items()})
        got = _open(out, t)[0]
        counts[got, np.arange(rows)] += 1
    assert (counts > 0).all()  # P(some cell empty) < 16·(3/4)^40 ≈ 2e-4


def test_random_permutation_is_a_permutation():
    for size in (0, 1, 2, 1000):
        assert sorted(join.random_permutation(size)) == list(range(size))


def test_a_bad_permutation_from_a_peer_is_refused():
    v = field.from_ints([0, 0, 1])
    with pytest.raises(EngineError):
        join._as_permutation(v, 3)
    with pytest.raises(EngineError):
        join._as_permutation(field.from_ints([0, 3, 1]), 3)
    assert list(join._as_permutation(field.from_ints([2, 0, 1]), 3)) == [2, 0, 1]


# ---------------------------------------------------------------- equi-join


def plain_join(a_rows, b_rows):
    """Rows (a..., b without its key...) of the inner join of two lists of (key, values...)."""
    return Counter(ra + rb[1:] for ra, rb in itertools.product(a_rows, b_rows) if ra[0] == rb[0])


def run_join(n, t, a_rows, b_rows, **kw):
    """Share two tables whose column 0 is the key; join in MPC; the opened joined rows and the views."""
    a_cols = list(zip(*a_rows, strict=True)) if a_rows else [(), (), ()]
    b_cols = list(zip(*b_rows, strict=True)) if b_rows else [(), ()]
    sa = [_share(n, t, c) for c in a_cols]
    sb = [_share(n, t, c) for c in b_cols]

    def prog(ctx):
        x = ctx.me
        a = {"key": sa[0][x], "u": sa[1][x], "v": sa[2][x]}
        b = {"key_b": sb[0][x], "w": sb[1][x]}
        return (yield from join.equi_join(ctx, a, a["key"], b, b["key_b"], **kw))

    views = {}
    out = run_local({x: prog(c) for x, c in _ctxs(n, t).items()}, views=views)
    rows = {r for _, r in out.values()}
    assert len(rows) == 1
    (rows,) = rows
    names = list(out[1][0])
    assert names == ["key", "u", "v", "w"]  # A's columns, then B's without its key
    cols = [_open({x: out[x][0][name] for x in out}, t) for name in names]
    assert all(len(c) == rows for c in cols)
    return Counter(zip(*cols, strict=True)) if rows else Counter(), rows, views


@pytest.mark.parametrize(("n", "t"), SETUPS)
def test_equi_join_matches_the_plaintext_join_with_duplicate_ids(n, t):
    rng = np.random.default_rng(n)
    keys = [id_hash(s) for s in ("ann", "bob", "cyd", "dee", "eve")]
    a_rows = [(keys[k], int(rng.integers(0, 1000)), -int(rng.integers(0, 1000)))
              for k in (0, 1, 1, 2, 4, 4, 4)]
    b_rows = [(keys[k], int(rng.integers(0, 1000))) for k in (1, 3, 4, 4, 0, 1, 3)]
    got, rows, views = run_join(n, t, a_rows, b_rows)
    want = plain_join(a_rows, b_rows)
    assert rows == sum(want.values()) == 1 + 2 * 2 + 3 * 2
    assert got == want
    assert len(views[1]) == 1 + math.comb(n, t + 1) + 1
    assert len(views[1]) == join.join_rounds(Context(me=1, parties=_parties(n), t=t), 7, 7)


def test_equi_join_without_matches_and_with_empty_tables():
    n, t = 3, 1
    a_rows = [(id_hash(f"a{i}"), i, i) for i in range(5)]
    b_rows = [(id_hash(f"b{i}"), i) for i in range(4)]
    got, rows, _ = run_join(n, t, a_rows, b_rows)
    assert rows == 0 and got == Counter()
    got, rows, views = run_join(n, t, [], b_rows)
    assert rows == 0 and len(views[1]) == 1 + math.comb(n, t + 1)
    got, rows, _ = run_join(n, t, a_rows, [])
    assert rows == 0


def test_equi_join_in_blocks_pipelines_the_randomness():
    n, t = 3, 1
    rng = np.random.default_rng(7)
    a_rows = [(int(k), i, 2 * i) for i, k in enumerate(rng.integers(0, 6, 11))]
    b_rows = [(int(k), 10 * i) for i, k in enumerate(rng.integers(0, 6, 9))]
    got, _, views = run_join(n, t, a_rows, b_rows, block_pairs=20)  # 2 rows of A per block: 6 blocks
    assert got == plain_join(a_rows, b_rows)
    assert len(views[1]) == 1 + math.comb(n, t + 1) + 6


def test_equi_join_reveals_only_the_pattern(monkeypatch):
    """Every opened z is 0 for equal ids and otherwise a large field element (never the id difference)."""
    opened = []
    orig = join._open_step

    def spy(ctx, v, degree):
        step = orig(ctx, v, degree)

        def finish(part):
            z = step.finish(part)
            opened.append(field.to_ints(z))
            return z

        return join._Step(step.out, step.shapes, finish)

    monkeypatch.setattr(join, "_open_step", spy)
    _, rows, _ = run_join(3, 1, [(5, 0, 0), (7, 0, 0)], [(5, 0), (6, 0)])
    assert rows == 1 and len(opened) == 3  # one opening per party
    for z in opened:
        flat = [x for row in z for x in row]
        assert flat.count(0) == 1
        assert all(min(x, field.P - x) > 2**60 for x in flat if x)


def test_equi_join_argument_checks():
    ctx = Context(me=1, parties=(1, 2, 3), t=1)
    k = field.zeros(3)
    with pytest.raises(LocalError):
        next(join.equi_join(ctx, {"x": k}, k, {"x": field.zeros(2)}, field.zeros(2)))
    with pytest.raises(LocalError):
        next(join.equi_join(ctx, {"x": field.zeros(4)}, k, {}, field.zeros(2)))
    with pytest.raises(LocalError):
        next(join.equi_join(ctx, {}, k, {}, field.zeros(2), block_pairs=0))


def _factor_attack(h_by_x, d1):
    """Party 1's guesses of d(0) from an opened quadratic h = r·d (+ o) at x = 1, 2, 3 and its share d(1).

    If h = r(x)·d(x) with d(x) = d0 + d1'x, one root of h is ρ = -d0/d1', and
    d(1) = d1'(1 - ρ) gives d0 = -ρ·d(1)/(1 - ρ): one guess per root.
    """
    p = field.P
    inv = lambda a: pow(a, p - 2, p)  # noqa: E731
    y1, y2, y3 = (h_by_x[x] for x in (1, 2, 3))
    h2 = (y1 - 2 * y2 + y3) * inv(2) % p
    h1 = (y2 - y1 - 3 * h2) % p
    h0 = (y1 - h1 - h2) % p
    disc = (h1 * h1 - 4 * h0 * h2) % p
    s = pow(disc, (p + 1) // 4, p)
    if h2 == 0 or s * s % p != disc:
        return set()
    roots = {(-h1 + s) * inv(2 * h2) % p, (-h1 - s) * inv(2 * h2) % p}
    return {(-rho * d1 * inv(1 - rho)) % p for rho in roots if rho != 1}


@pytest.mark.parametrize("with_zero", [False, True])
def test_the_opened_polynomial_hides_the_id_difference(with_zero):
    """Opening r·d + o (o a random degree-2t sharing of 0) reveals only whether d = 0.

    Without o (the bare local product, open_2t's usual use), party 1 factors
    the opened quadratic and with its own share of d recovers d itself: the
    test's power. With o — what equi_join opens — that attack fails.
    """
    n, t, size = 3, 1, 200
    rng = np.random.default_rng(5)
    d = [int(v) for v in rng.integers(1, 2**40, size)]
    dealt = _share(n, t, d)
    shape = (size,)

    def prog(ctx):
        ((r, zero),) = yield from join._round(ctx, [join._deal_step(ctx, shape)])
        z = field.mul(r, dealt[ctx.me])
        if with_zero:
            z = field.add(z, zero)
        (opened,) = yield from join._round(ctx, [join._open_step(ctx, z, 2 * t)])
        return z, opened

    views = {}
    out = run_local({x: prog(c) for x, c in _ctxs(n, t).items()}, views=views)
    h = {1: field.to_ints(out[1][0])} | {peer: field.to_ints(v[0]) for peer, v in views[1][-1].items()}
    d1 = field.to_ints(dealt[1])
    hits = sum(d[k] in _factor_attack({x: h[x][k] for x in h}, d1[k]) for k in range(size))
    assert hits == (0 if with_zero else size)


# ---------------------------------------------------------------- statistics over a join


def Query(op: str, **kw: object) -> qmod.Query:
    """The real query over table "a" (the join's left side)."""
    return qmod.Query(op=op, tables=("a",), **kw)


def Join(table: str, on: str) -> qmod.Join:
    return qmod.Join(table=table, on=on)


Compare = qmod.Compare


SCHEMA_A = Schema(
    columns=(
        Column(name="pid", type="id"),
        Column(name="age", type="integer", min=0, max=120),
        Column(name="sex", type="categorical", values=("F", "M")),
    ),
    min_group_size=2,
)
SCHEMA_B = Schema(
    columns=(Column(name="pid", type="id"), Column(name="dose", type="fixed", decimals=1, min=0, max=100)),
    min_group_size=3,
)


def _tables(rng):
    names = [f"p{i}" for i in range(10)]
    a = {"pid": [id_hash(names[i]) for i in range(10)], "age": list(rng.integers(18, 90, 10)),
         "sex": list(rng.integers(0, 2, 10))}
    a["sex=F"] = [int(s == 0) for s in a["sex"]]
    a["sex=M"] = [int(s == 1) for s in a["sex"]]
    picks = [1, 2, 2, 3, 5, 5, 5, 8, 11, 12]  # p11, p12 are in B only
    b = {"pid": [id_hash(f"p{i}") for i in picks], "dose": list(rng.integers(0, 1001, len(picks)))}
    return a, b


def _run_stats(n, t, query, a, b):
    sa = {k: _share(n, t, [int(v) for v in vals]) for k, vals in a.items()}
    sb = {k: _share(n, t, [int(v) for v in vals]) for k, vals in b.items()}
    progs = {
        x: join.joined_program(c, query, SCHEMA_A, {k: v[x] for k, v in sa.items()}, len(a["pid"]),
                               SCHEMA_B, {k: v[x] for k, v in sb.items()}, len(b["pid"]))
        for x, c in _ctxs(n, t).items()
    }
    out = run_local(progs)
    return {g: field.to_signed(shamir.reconstruct({x: out[x][g] for x in out})) for g in out[1]}


def _plain(a, b):
    rows = []
    for i, ka in enumerate(a["pid"]):
        for j, kb in enumerate(b["pid"]):
            if ka == kb:
                rows.append((int(a["age"][i]), int(a["sex"][i]), int(b["dose"][j])))
    return np.array(rows)


@pytest.mark.parametrize(("n", "t"), SETUPS)
def test_joined_program_count_and_mean_match_numpy(n, t):
    rng = np.random.default_rng(10 + n)
    a, b = _tables(rng)
    rows = _plain(a, b)
    assert len(rows) == 1 + 2 + 1 + 3 + 1
    got = _run_stats(n, t, Query("count", join=Join("b", "pid")), a, b)
    assert got == {"g0": [1, len(rows)]}
    q = Query("mean", columns=("dose",), where=Compare("age", ">=", 40), join=Join("b", "pid"))
    got = _run_stats(n, t, q, a, b)
    sel = rows[rows[:, 0] >= 40]
    ok = int(len(sel) >= 3)  # the larger min_group_size of the two tables
    assert got == {"g0": [ok, ok * len(sel), ok * int(sel[:, 2].sum())]}


def test_joined_program_grouped_by_a_column_of_the_other_table():
    n, t = 3, 1
    rng = np.random.default_rng(3)
    a, b = _tables(rng)
    rows = _plain(a, b)
    got = _run_stats(n, t, Query("sum", columns=("dose",), group_by=("sex",), join=Join("b", "pid")), a, b)
    for g, sex in (("g0", 0), ("g1", 1)):
        sel = rows[rows[:, 1] == sex]
        ok = int(len(sel) >= 3)
        assert got[g] == [ok, ok * len(sel), ok * int(sel[:, 2].sum())]


def test_joined_program_without_matches_suppresses():
    n, t = 3, 1
    rng = np.random.default_rng(4)
    a, b = _tables(rng)
    b["pid"] = [id_hash(f"q{i}") for i in range(len(b["pid"]))]
    got = _run_stats(n, t, Query("count", join=Join("b", "pid")), a, b)
    assert got == {"g0": [0, 0]}


def test_without_join_keeps_everything_else():
    q = Query("mean", columns=("x",), join=Join("b", "pid"))
    plain = join.without_join(q)
    assert plain.join is None and plain.columns == ("x",) and q.join is not None

    class Odd:
        op, columns, group_by, join = "count", (), (), Join("b", "pid")

    wrapped = join.without_join(Odd())
    assert wrapped.join is None and wrapped.op == "count"
    assert stats.plan(wrapped, SCHEMA_A).op == "count"


def test_joined_program_with_the_real_query():
    query = pytest.importorskip("qstore.query")
    rng = np.random.default_rng(11)
    a, b = _tables(rng)
    rows = _plain(a, b)
    q = query.Query(op="mean", tables=("a",), columns=("dose",), where=query.Compare("age", ">=", 30),
                    join=query.Join(table="b", on="pid"))
    assert join.without_join(q).join is None
    got = _run_stats(3, 1, q, a, b)
    sel = rows[rows[:, 0] >= 30]
    ok = int(len(sel) >= 3)
    assert got == {"g0": [ok, ok * len(sel), ok * int(sel[:, 2].sum())]}
