"""Robust reconstruction: find and correct wrong shares (Reed-Solomon decoding).

Shamir shares of one byte (an element of GF(2^8)) at x = 1..n are a codeword of a Reed-Solomon
code of length n and dimension k. With m >= k shares, up to
e = (m - k) // 2 wrong ones can be corrected at every element, and any
m - k wrong ones detected.

Wrong shares come from nodes (a disk that rots, a node that lies), so errors
cluster by share, not by element. The decoder exploits that and stays
vectorised:

1. Check: interpolate every extra share from k others over the whole
   buffer (one linear map) and mark the bytes where any
   disagrees. No mark: done.
2. Locate: on a few marked elements, run scalar Berlekamp-Welch to learn
   which shares are wrong there.
3. Correct: for each candidate set E of wrong shares (|E| <= e), erase E,
   rebuild from k of the rest and accept the result on every element where
   all the remaining shares agree with it. This is sound: if m - |E| >= m - e
   shares agree with a codeword, it shares at least m - 2e >= k points with
   the true codeword and so is the true one.
   Repeat 2-3 on what is still marked until nothing is (or a marked element
   cannot be decoded: ShareCorruption).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from qstore import gf256
from qstore.errors import ShareCorruption
from qstore.linmap import Backend
from qstore.sharing import Share, check_shares, interpolate

SAMPLES_PER_ROUND = 8
MAX_ROUNDS = 64


class Decoded(NamedTuple):
    """The rebuilt data and the x of every share found wrong (sorted)."""

    data: bytes
    bad: tuple[int, ...]


def _solve(a: list[list[int]], b: list[int]) -> list[int] | None:
    """One solution of a @ v = b over GF(2^8) (free variables 0), or None."""
    rows, cols = len(a), len(a[0])
    m = [row[:] + [rhs] for row, rhs in zip(a, b, strict=True)]
    pivots: list[int] = []
    r = 0
    for c in range(cols):
        p = next((i for i in range(r, rows) if m[i][c]), None)
        if p is None:
            continue
        m[r], m[p] = m[p], m[r]
        f = gf256.inv(m[r][c])
        m[r] = [gf256.mul(f, v) for v in m[r]]
        for i in range(rows):
            if i != r and m[i][c]:
                g = m[i][c]
                m[i] = [v ^ gf256.mul(g, w) for v, w in zip(m[i], m[r], strict=True)]
        pivots.append(c)
        r += 1
        if r == rows:
            break
    if any(row[-1] and not any(row[:-1]) for row in m):
        return None
    v = [0] * cols
    for i, c in enumerate(pivots):
        v[c] = m[i][-1]
    return v


def _poly_divmod(num: list[int], den: list[int]) -> tuple[list[int], list[int]]:
    """Quotient and remainder of polynomials (coefficient lists, low first)."""
    num = num[:]
    while den and den[-1] == 0:
        den = den[:-1]
    lead_inv = gf256.inv(den[-1])
    q = [0] * max(len(num) - len(den) + 1, 1)
    for i in range(len(num) - len(den), -1, -1):
        coef = gf256.mul(num[i + len(den) - 1], lead_inv)
        q[i] = coef
        if coef:
            for j, d in enumerate(den):
                num[i + j] ^= gf256.mul(coef, d)
    return q, num[: len(den) - 1]


def berlekamp_welch(xs: Sequence[int], ys: Sequence[int], k: int) -> tuple[list[int], list[int]] | None:
    """Decode one element: the polynomial (k coefficients) and wrong indices.

    Corrects up to (len(xs) - k) // 2 errors; returns None when the word is
    farther than that from every codeword.
    """
    m = len(xs)
    for e in range((m - k) // 2, -1, -1):
        # Unknowns: Q (k + e coefficients), E (e low coefficients, monic).
        # Q(x_i) - y_i * (E_low(x_i)) = y_i * x_i^e
        a, b = [], []
        for x, y in zip(xs, ys, strict=True):
            row = [gf256.power(x, j) for j in range(k + e)]
            row += [gf256.mul(y, gf256.power(x, j)) for j in range(e)]
            a.append(row)
            b.append(gf256.mul(y, gf256.power(x, e)))
        sol = _solve(a, b)
        if sol is None:
            continue
        q_poly, e_poly = sol[: k + e], sol[k + e :] + [1]
        p, rem = _poly_divmod(q_poly, e_poly)
        if any(rem):
            continue
        p = (p + [0] * k)[:k]
        wrong = [i for i, (x, y) in enumerate(zip(xs, ys, strict=True)) if gf256.poly_eval(p, x) != y]
        if len(wrong) <= (m - k) // 2:
            return p, wrong
    return None


def _disagreement(shares: Sequence[Share], base: Sequence[Share], backend: Backend | None) -> np.ndarray:
    """Mask of elements where some share of ``shares`` disagrees with ``base``'s polynomial."""
    base_xs = {s.x for s in base}
    others = [s for s in shares if s.x not in base_xs]
    length = len(base[0].data)
    if not others:
        return np.zeros(length, dtype=bool)
    predicted = interpolate(base, tuple(s.x for s in others), backend)
    mask = np.zeros(length, dtype=bool)
    for row, s in zip(predicted, others, strict=True):
        row ^= np.frombuffer(s.data, dtype=np.uint8)
        mask |= row != 0
    return mask


def decode(shares: Sequence[Share], k: int | None = None, *, backend: Backend | None = None) -> Decoded:
    """Rebuild data from m >= k shares, correcting up to (m - k) // 2 wrong ones.

    Raises ShareCorruption (naming the shares found wrong, if any) when the
    shares disagree beyond that; with m = k + 1 a wrong share is detected
    but cannot be corrected.
    """
    check_shares(shares)
    k = shares[0].k if k is None else k
    shares = sorted(shares, key=lambda s: s.x)
    m = len(shares)
    e_max = (m - k) // 2
    base = shares[:k]
    todo = _disagreement(shares, base, backend)
    # Where all m shares agree, any k of them give the right value.
    result = interpolate(base, (0,), backend)[0]
    if not todo.any():
        return Decoded(result.tobytes(), ())
    if e_max == 0:
        raise ShareCorruption(f"{m} shares disagree and {m - k} extra share(s) cannot correct an error")

    arrays = [np.frombuffer(s.data, dtype=np.uint8) for s in shares]
    xs = [s.x for s in shares]
    bad: set[int] = set()
    tried: set[frozenset[int]] = set()
    for _ in range(MAX_ROUNDS):
        positions = np.flatnonzero(todo)
        if len(positions) == 0:
            return Decoded(result.tobytes(), tuple(sorted(bad)))
        picks = np.linspace(0, len(positions) - 1, min(SAMPLES_PER_ROUND, len(positions)))
        sample = positions[picks.astype(int)]
        values = np.stack([a[sample] for a in arrays])  # (m, samples)
        candidates: list[frozenset[int]] = []
        for j in range(len(sample)):
            decoded = berlekamp_welch(xs, [int(v) for v in values[:, j]], k)
            if decoded is None:
                raise ShareCorruption(
                    f"element {int(sample[j])} has more than {e_max} wrong share(s)", tuple(sorted(bad))
                )
            wrong = frozenset(xs[i] for i in decoded[1])
            bad.update(wrong)
            if wrong not in tried and wrong not in candidates:
                candidates.append(wrong)
        union = frozenset().union(*candidates)
        if len(union) <= e_max and union not in tried and len(candidates) > 1:
            candidates.insert(0, union)
        for erased in candidates:
            tried.add(erased)
            kept = [s for s in shares if s.x not in erased]
            ok = ~_disagreement(kept, kept[:k], backend) & todo
            if ok.any():
                value = interpolate(kept[:k], (0,), backend)[0]
                np.copyto(result, value, where=ok)
                todo &= ~ok
    raise ShareCorruption("shares disagree in too many different ways to correct", tuple(sorted(bad)))
