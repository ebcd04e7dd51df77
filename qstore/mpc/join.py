"""Equi-join of two secret-shared tables on an id column, revealing only the join's equality pattern.

Issue 6: "an equi-join on an id column between two owners' tables (revealing
at most the join size)". Semi-honest parties, honest majority (n ≥ 2t+1, up
to t of them curious), information-theoretic: no PRF, hash or cipher is
relied on for secrecy (the id hashes of :mod:`qstore.tables` only make ids
comparable as field elements).

How (all vectorised, engine protocols composed with ``yield from``):

1. :func:`shuffle` / :func:`shuffle_many`: a secret random permutation of
   each table's rows that no t parties know. For every subset S of t+1
   parties (all C(n, t+1) of them, in a fixed public order) the parties of S
   turn the Shamir sharing into an additive one among themselves (each
   multiplies its share by its Lagrange coefficient for S at 0), each permutes
   its additive share with a permutation π_S known to S only, and reshares it
   with a fresh degree-t sharing to every party; everyone sums what S's
   members sent. Some S holds no curious party (n - t ≥ t + 1), so the
   composition of all π_S is uniform to any t parties. π_S is drawn by S's
   smallest member (its randomness: ``ctx.rng``, else the OS) and sent to the
   others of S in one round at the start, as the permuted row indices
   themselves — not as a seed expanded by a cipher, so that the permutation is
   information-theoretically random (N field elements per permutation: less
   than what one resharing of the table costs).
2. :func:`equi_join`: shuffle both tables (independent permutations, the same
   rounds), then for every pair (i, j) of shuffled rows open
   z_ij = r_ij·(a_i - b_j) + o_ij, with r_ij a fresh joint random degree-t
   sharing and o_ij a fresh joint random degree-2t sharing of zero.
   z_ij = 0 iff the ids are equal, otherwise it is uniform on F_p \\ {0}.
   The zero sharing matters: the bare local product r·(a - b) is a degree-2t
   sharing whose *polynomial* is the product of the two degree-t
   polynomials; opening it lets a curious party factor it and, with its own
   share, recover a - b (for t = 1 the roots give it away at once). Adding o
   makes the opened polynomial uniform given its constant term.
3. The joined table is built locally from the public pattern: the pairs with
   z_ij = 0 in row-major order of the shuffled tables, taking shares of A's
   row i and B's row j (no communication).

What the parties learn: the equality pattern between the *shuffled* rows,
i.e. the join size and, when ids repeat, for every id value present in both
tables the pair (rows of A with it, rows of B with it) — a multiset of
multiplicities, with no link to the rows' original positions, no id value,
and nothing about ids that match nothing (beyond how many rows match
nothing). Equal ids within one table are seen only through a common partner
in the other.

Costs (n parties, t curious, K = C(n, t+1) subsets, tables of N and M rows
with C_A and C_B columns carried, id included; elements are 16 bytes):

* rounds: 1 (permutations, and the first block's randomness) + K (one
  resharing per subset) + B (one opening per block of pairs; the randomness
  of the next block travels with it), B = ceil(N·M / 2^20) roughly; 0 when a
  table is empty.
* shuffle: per subset, each of its t+1 members sends (C_A·N + C_B·M) elements
  to each of the n - 1 other parties; the leader sends N + M indices to each
  of the t others.
* pairs: every party sends each peer N·M elements (the opening: 16·N·M bytes
  per party per peer), and each of the t+1 dealers additionally 2·N·M (r and
  the zero sharing). Local work and memory are bounded by the block size
  (a few vectors of 2^20 elements).

The join is quadratic in traffic by design (a pairwise comparison, no
oblivious sorting): meant for tables of up to some thousands of rows each.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qstore import field
from qstore.errors import LocalError
from qstore.field import Vec
from qstore.mpc import shamir
from qstore.mpc.engine import Context, EngineError, Exchange, Inbox, Protocol, ProtocolError, expect

__all__ = ["BLOCK_PAIRS", "equi_join", "join_rounds", "joined_program", "shuffle", "shuffle_many"]

BLOCK_PAIRS = 1 << 20  # pairs (i, j) compared per round of the join: bounds local memory


# ---------------------------------------------------------------- single-round steps, run side by side


@dataclass(frozen=True)
class _Step:
    """One round's part of a protocol: what I send, what each peer sends me, and what to make of it.

    Steps of different sub-protocols can share a round (:func:`_round`)
    because every party knows, from public facts alone, how many vectors of
    which shapes each peer sends for each step.
    """

    out: dict[int, list[Vec]]  # peer → the vectors I send it
    shapes: Callable[[int], list[tuple[int, ...]]]  # peer → element shapes it sends me
    finish: Callable[[Inbox], Any]  # this step's part of the inbox → the step's result


def _round(ctx: Context, steps: Sequence[_Step]) -> Protocol[list[Any]]:
    """Run single-round steps in one communication round; their results in order."""
    out = {peer: [v for s in steps for v in s.out[peer]] for peer in ctx.peers}
    inbox = yield Exchange(out)
    want = {peer: [[tuple(sh) for sh in s.shapes(peer)] for s in steps] for peer in ctx.peers}
    inbox = expect(ctx, inbox, lambda peer: [sh for part in want[peer] for sh in part])
    results = []
    start = dict.fromkeys(ctx.peers, 0)
    for k, s in enumerate(steps):
        part: Inbox = {}
        for peer in ctx.peers:
            m = len(want[peer][k])
            part[peer] = inbox[peer][start[peer] : start[peer] + m]
            start[peer] += m
        results.append(s.finish(part))
    return results


def _elements(v: Vec) -> tuple[int, ...]:
    return v.shape[:-1]


def _sum(vecs: Sequence[Vec]) -> Vec:
    return field.lincomb([1] * len(vecs), vecs)


def _random_bytes(nbytes: int, rng: Any) -> bytes:
    if rng is None:
        return os.urandom(nbytes)
    buf = bytearray(nbytes)
    if nbytes:
        rng.fill(memoryview(buf), rng.reserve(nbytes))
    return bytes(buf)


def random_permutation(n: int, rng: Any = None) -> np.ndarray:
    """A uniformly random permutation of range(n) (int64), from ``rng`` (a RandomSource) or the OS.

    The argsort of n independent uniform 64-bit keys, redrawn until they are
    distinct: conditioned on distinct keys every order is equally likely.
    """
    while True:
        keys = np.frombuffer(_random_bytes(8 * n, rng), dtype=np.uint64)
        order = np.argsort(keys, kind="stable")
        if n < 2 or bool(np.all(keys[order[1:]] != keys[order[:-1]])):
            return order.astype(np.int64)


def _as_permutation(v: Vec, n: int) -> np.ndarray:
    """A peer's permutation (field elements) → int64 indices; EngineError unless a permutation of n."""
    if n and (v[..., 1].any() or int(v[..., 0].max()) >= n):
        raise EngineError("a permutation sent by a peer has an index out of range")
    perm = v[..., 0].astype(np.int64)
    seen = np.zeros(n, dtype=bool)
    seen[perm] = True
    if not seen.all():
        raise EngineError("a permutation sent by a peer repeats an index")
    return perm


def _subsets(ctx: Context) -> list[tuple[int, ...]]:
    return list(itertools.combinations(ctx.parties, ctx.t + 1))


def _permutations_step(ctx: Context, sizes: Sequence[int]) -> _Step:
    """The leader (smallest x) of every subset S that I am in draws S's permutations, one per table."""
    subsets = _subsets(ctx)
    mine: dict[tuple[int, ...], list[np.ndarray]] = {}
    out: dict[int, list[Vec]] = {peer: [] for peer in ctx.peers}
    for s in subsets:
        if s[0] == ctx.me:
            perms = [random_permutation(n, ctx.rng) for n in sizes]
            mine[s] = perms
            for peer in s[1:]:
                out[peer].extend(field.from_ints(p) for p in perms)

    def led_by(peer: int) -> list[tuple[int, ...]]:
        return [s for s in subsets if s[0] == peer and ctx.me in s]

    def shapes(peer: int) -> list[tuple[int, ...]]:
        return [(n,) for _ in led_by(peer) for n in sizes]

    def finish(part: Inbox) -> dict[tuple[int, ...], list[np.ndarray]]:
        perms = dict(mine)
        for peer, vecs in part.items():
            it = iter(vecs)
            for s in led_by(peer):
                perms[s] = [_as_permutation(next(it), n) for n in sizes]
        return perms

    return _Step(out, shapes, finish)


def _reshare_step(
    ctx: Context, s: tuple[int, ...], tables: Sequence[Vec], perms: Sequence[np.ndarray] | None
) -> _Step:
    """S's members reshare their permuted additive shares; everyone sums: a sharing of the permuted tables.

    ``perms``: S's permutations, one per table (None unless I am in S).
    """
    shapes_t = [_elements(x) for x in tables]
    own: list[Vec] = []
    if ctx.me in s:
        assert perms is not None
        lam = shamir.lagrange(s)[s.index(ctx.me)]
        dealt = [
            shamir.share(np.take(field.scale(x, lam), perm, axis=-2), ctx.parties, ctx.t, ctx.rng)
            for x, perm in zip(tables, perms, strict=True)
        ]
        own = [d[ctx.me] for d in dealt]
        out = {peer: [d[peer] for d in dealt] for peer in ctx.peers}
    else:
        out = {peer: [] for peer in ctx.peers}

    def finish(part: Inbox) -> list[Vec]:
        got = {x: (own if x == ctx.me else part[x]) for x in s}
        return [_sum([got[x][k] for x in s]) for k in range(len(tables))]

    return _Step(out, lambda peer: shapes_t if peer in s else [], finish)


def _deal_step(ctx: Context, shape: tuple[int, ...]) -> _Step:
    """Joint randomness for one block of pairs: shares of uniform r (degree t) and of 0 (degree 2t).

    The first t+1 parties each deal both; everyone sums, so any t parties
    miss one dealer's contribution to each.
    """
    dealers = ctx.parties[: ctx.t + 1]
    own: list[Vec] = []
    if ctx.me in dealers:
        dr = shamir.share(field.random(shape, ctx.rng), ctx.parties, ctx.t, ctx.rng)
        dz = shamir.share(field.zeros(shape), ctx.parties, 2 * ctx.t, ctx.rng)
        own = [dr[ctx.me], dz[ctx.me]]
        out = {peer: [dr[peer], dz[peer]] for peer in ctx.peers}
    else:
        out = {peer: [] for peer in ctx.peers}

    def finish(part: Inbox) -> tuple[Vec, Vec]:
        got = {x: (own if x == ctx.me else part[x]) for x in dealers}
        return _sum([got[x][0] for x in dealers]), _sum([got[x][1] for x in dealers])

    return _Step(out, lambda peer: [shape, shape] if peer in dealers else [], finish)


def _open_step(ctx: Context, v: Vec, degree: int) -> _Step:
    """Open a sharing of the given degree (checked consistent when more than degree+1 parties)."""

    def finish(part: Inbox) -> Vec:
        shares = {ctx.me: v} | {peer: got[0] for peer, got in part.items()}
        if not shamir.consistent(shares, degree):
            raise ProtocolError(f"the shares opened do not lie on one polynomial of degree {degree}")
        xs = sorted(shares)[: degree + 1]
        return shamir.reconstruct({x: shares[x] for x in xs})

    return _Step({peer: [v] for peer in ctx.peers}, lambda peer: [_elements(v)], finish)


# ---------------------------------------------------------------- shuffle


def _check_table(x: Vec, what: str) -> Vec:
    if not isinstance(x, np.ndarray) or x.dtype != np.uint64 or x.ndim < 2 or x.shape[-1] != 2:
        raise LocalError(f"{what} must be a field vector with a row axis: shape (..., N, 2)")
    return x


def _shuffle_rounds(
    ctx: Context, tables: Sequence[Vec], first: Sequence[_Step] = ()
) -> Protocol[tuple[list[Vec], list[Any]]]:
    """Shuffle every table; ``first``: more steps to run in the permutations' round (their results too)."""
    sizes = [x.shape[-2] for x in tables]
    got = yield from _round(ctx, [_permutations_step(ctx, sizes), *first])
    perms, extra = got[0], got[1:]
    tables = list(tables)
    for s in _subsets(ctx):
        (tables,) = yield from _round(ctx, [_reshare_step(ctx, s, tables, perms.get(s))])
    return tables, extra


def shuffle_many(ctx: Context, tables: Sequence[Vec]) -> Protocol[list[Vec]]:
    """Shuffle the rows of several tables, each with its own secret permutation, in the same rounds.

    ``tables``: shares of shape (..., N_k) each (rows on the last element
    axis; leading axes, e.g. columns, move together). Returns fresh degree-t
    shares of the permuted tables. Rounds: 1 + C(n, t+1). Reveals nothing.
    """
    tables = [_check_table(x, "a table") for x in tables]
    out, _ = yield from _shuffle_rounds(ctx, tables)
    return out


def shuffle(ctx: Context, columns: Vec) -> Protocol[Vec]:
    """Shares of the rows of ``columns`` (shape (C, N)) in a secret random order, rows kept together.

    The permutation is uniform and unknown to any t parties (see the module
    doc). Rounds: 1 + C(n, t+1); per subset S of t+1 parties each member of S
    sends C·N elements to every other party. Reveals nothing.
    """
    return (yield from shuffle_many(ctx, [columns]))[0]


# ---------------------------------------------------------------- equi-join


def _blocks(n: int, m: int, block_pairs: int) -> list[tuple[int, int]]:
    """Ranges of A's rows compared with all of B's rows in one round each."""
    if n == 0 or m == 0:
        return []
    step = max(1, block_pairs // m)
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


def join_rounds(ctx: Context, n: int, m: int, block_pairs: int = BLOCK_PAIRS) -> int:
    """The number of rounds :func:`equi_join` takes for tables of n and m rows."""
    return 1 + len(_subsets(ctx)) + len(_blocks(n, m, block_pairs))


def _stack(cols: Sequence[Vec], rows: int) -> Vec:
    return np.stack(cols) if cols else field.zeros((0, rows))


def equi_join(
    ctx: Context,
    a: Mapping[str, Vec],
    a_id: Vec,
    b: Mapping[str, Vec],
    b_id: Vec,
    *,
    block_pairs: int = BLOCK_PAIRS,
) -> Protocol[tuple[dict[str, Vec], int]]:
    """The inner equi-join of tables A and B on ``a_id = b_id``: (joined columns' shares, row count).

    ``a``: A's columns to carry (name → shares of shape (N,)), ``a_id`` A's
    join column (N,); likewise ``b``, ``b_id`` with M rows. A column of ``a``
    that is ``a_id`` itself (the same array) is carried without being shuffled
    twice; a column of ``b`` that is ``b_id`` is dropped (the joined table
    keeps A's copy of the key). The result has A's columns, then B's, each of
    shape (rows,), one row per matching pair, ordered by the pairs' positions
    in the shuffled tables (row-major): the same on every party. ``rows`` (the
    join size) is public.

    Reveals the equality pattern of the shuffled rows only (module doc).
    Rounds: :func:`join_rounds`. ``block_pairs``: pairs compared per round.
    """
    a_id, b_id = _check_table(a_id, "a_id"), _check_table(b_id, "b_id")
    if a_id.ndim != 2 or b_id.ndim != 2:
        raise LocalError("the id columns must have shape (rows, 2)")
    n, m = a_id.shape[0], b_id.shape[0]
    clash = sorted(set(a) & {k for k, v in b.items() if v is not b_id})
    if clash:
        raise LocalError(f"column {clash[0]!r} is in both joined tables")
    if not isinstance(block_pairs, int) or block_pairs < 1:
        raise LocalError("block_pairs must be a positive integer")
    a_names, a_cols = list(a), []
    id_row = None
    for i, name in enumerate(a_names):
        v = a[name]
        if v is a_id:
            id_row = i
        elif not isinstance(v, np.ndarray) or v.shape != a_id.shape or v.dtype != np.uint64:
            raise LocalError(f"column {name!r} of A must have shape ({n}, 2) like its id column")
        a_cols.append(v)
    if id_row is None:
        a_cols.append(a_id)
        id_row = len(a_cols) - 1
    b_names = [k for k, v in b.items() if v is not b_id]
    for name in b_names:
        v = b[name]
        if not isinstance(v, np.ndarray) or v.shape != b_id.shape or v.dtype != np.uint64:
            raise LocalError(f"column {name!r} of B must have shape ({m}, 2) like its id column")
    b_cols = [b[k] for k in b_names] + [b_id]

    blocks = _blocks(n, m, block_pairs)
    first = [_deal_step(ctx, (blocks[0][1] - blocks[0][0], m))] if blocks else []
    (ta, tb), extra = yield from _shuffle_rounds(ctx, [_stack(a_cols, n), _stack(b_cols, m)], first)
    ka, kb = ta[id_row], tb[-1]
    pending = extra[0] if blocks else None
    rows_i: list[np.ndarray] = []
    rows_j: list[np.ndarray] = []
    for k, (lo, hi) in enumerate(blocks):
        assert pending is not None
        r, zero = pending
        d = field.sub(np.ascontiguousarray(np.broadcast_to(ka[lo:hi, None], (hi - lo, m, 2))), kb[None])
        z = field.add(field.mul(r, d), zero)
        steps = [_open_step(ctx, z, 2 * ctx.t)]
        if k + 1 < len(blocks):
            nlo, nhi = blocks[k + 1]
            steps.append(_deal_step(ctx, (nhi - nlo, m)))
        got = yield from _round(ctx, steps)
        opened = got[0]
        pending = got[1] if len(got) > 1 else None
        i, j = np.nonzero((opened[..., 0] == 0) & (opened[..., 1] == 0))
        rows_i.append(i + lo)
        rows_j.append(j)
    ii = np.concatenate(rows_i) if rows_i else np.zeros(0, dtype=np.int64)
    jj = np.concatenate(rows_j) if rows_j else np.zeros(0, dtype=np.int64)
    ja, jb = np.take(ta, ii, axis=1), np.take(tb, jj, axis=1)
    out = {name: np.ascontiguousarray(ja[k]) for k, name in enumerate(a_names)}
    out |= {name: np.ascontiguousarray(jb[k]) for k, name in enumerate(b_names)}
    return out, len(ii)


# ---------------------------------------------------------------- statistics over a join


class _NoJoin:
    """A read-only view of a query without its join (for query objects that are not dataclasses)."""

    def __init__(self, query: Any):
        self._query = query

    join = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._query, name)


def without_join(query: Any) -> Any:
    """``query`` with ``join = None``: a dataclass is replaced, a named tuple ``_replace``d, else wrapped."""
    if dataclasses.is_dataclass(query) and not isinstance(query, type):
        return dataclasses.replace(query, join=None)
    if hasattr(query, "_replace"):
        return query._replace(join=None)
    return _NoJoin(query)


def joined_program(
    ctx: Context,
    query: Any,
    schema_a: Any,
    data_a: Mapping[str, Vec],
    rows_a: int,
    schema_b: Any,
    data_b: Mapping[str, Vec],
    rows_b: int,
) -> Protocol[dict[str, Vec]]:
    """``query`` over the equi-join of table A with table B on ``query.join.on`` (an id column of both).

    ``data_a``/``data_b``: this node's shares, stored column name → (rows,);
    they must hold the join column and every column the query needs (other
    columns are ignored: only the needed ones are shuffled). Runs
    :func:`equi_join`, then :func:`qstore.mpc.stats.program` on the joined
    table (schema :func:`qstore.tables.join_schema`, row count = join size,
    which the nodes learn). Rounds: :func:`join_rounds` plus the query's.
    """
    from qstore.mpc import stats  # stats may import this module: resolve at call time
    from qstore.tables import join_schema

    on = query.join.on
    schema = join_schema(schema_a, schema_b, on)
    plain = without_join(query)
    needed = [c for c in stats.columns_needed(plain, schema) if c != on]
    a_side = set(schema_a.stored_columns())
    for side, data, rows in (("A", data_a, rows_a), ("B", data_b, rows_b)):
        if on not in data:
            raise LocalError(f"the join column {on!r} of table {side} was not loaded")
        if data[on].shape != (rows, 2):
            raise LocalError(f"table {side} has {data[on].shape[0]} rows of shares, not {rows}")
    a: dict[str, Vec] = {}
    b: dict[str, Vec] = {}
    for c in needed:
        side, data = ("A", data_a) if c in a_side else ("B", data_b)
        if c not in data:
            raise LocalError(f"column {c!r} of table {side} was not loaded")
        (a if side == "A" else b)[c] = data[c]
    joined, rows = yield from equi_join(ctx, a, data_a[on], b, data_b[on])
    return (yield from stats.program(ctx, plain, schema, joined, rows))
