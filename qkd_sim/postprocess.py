"""Classical post-processing of a sifted QKD key: Cascade, Toeplitz hashing, key length.

Pure numpy and sans-IO. Keys are numpy ``uint8`` arrays of bits (one bit a
byte, values 0/1).

* **Error correction (Cascade)**, Brassard & Salvail 1993 with the usual
  improvements: first block size 0.73/QBER, four passes with block sizes
  doubling, a fresh random permutation per pass, the cascade effect (a bit
  corrected in pass i reopens the blocks of earlier passes that hold it), and
  reuse of every parity Alice ever disclosed (the binary-search tree of each
  block is cached, so a reopened block never asks a question twice). Bob runs
  :func:`cascade`; Alice is a :class:`CascadeAlice` that only answers
  parity queries. Every query names the positions it is about, so Alice
  needs no state of the protocol, the object in between can be a network
  message, and the bits it gives away are counted where they are given.
* **Privacy amplification** by Toeplitz hashing, ``y = T·x`` over GF(2),
  computed as a block-wise FFT convolution (:func:`toeplitz_hash`) next to the
  plain matrix product (:func:`toeplitz_hash_reference`) it is tested against.
* **Key length** (:func:`final_key_length`): asymptotic Shor–Preskill
  ``n(1 - h(e)) - leak``, or finite-size in the style of Tomamichel, Lim,
  Gisin & Renner (Nat. Commun. 3, 634, 2012).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from qstore.errors import LocalError, RemoteError

U8 = npt.NDArray[np.uint8]
Index = npt.NDArray[np.intp]

# Cascade's classic tuning (Brassard & Salvail 1993): k1 = 0.73 / QBER.
BLOCK_FACTOR = 0.73
CASCADE_PASSES = 4
# Below this QBER the first block would be so long that a sample showing no
# errors could hide pairs of them; the leak saved beyond it is negligible.
MIN_BLOCK_QBER = 1e-3
VERIFY_BITS = 64
# Toeplitz blocks: FFTs of 2·B points; bounds memory and the float error.
_TOEPLITZ_BLOCK = 1 << 17


class ReconciliationError(RemoteError):
    """Bob's corrected key still differs from Alice's (the verification hash disagrees)."""

    status = 422


class QueryError(RemoteError):
    """A parity query names positions outside the key, or an empty segment."""


class CascadeResult(NamedTuple):
    """Bob's corrected key and what correcting it cost."""

    key: U8
    leaked_bits: int  # parity and hash bits Alice disclosed
    n_queries: int  # messages Bob sent to Alice (round trips)


def _as_bits(bits: npt.ArrayLike, name: str) -> U8:
    arr = np.asarray(bits)
    if arr.ndim != 1:
        raise LocalError(f"{name} must be a 1-D array of bits")
    arr = arr.astype(np.uint8, copy=False)
    if arr.size and arr.max() > 1:
        raise LocalError(f"{name} must hold only 0 and 1")
    return arr


def binary_entropy(p: npt.ArrayLike) -> npt.NDArray[np.float64] | float:
    """h(p) = -p log2 p - (1-p) log2 (1-p), with h(0) = h(1) = 0; scalars give floats."""
    q = np.asarray(p, dtype=np.float64)
    if np.any((q < 0) | (q > 1)):
        raise LocalError("binary entropy needs 0 <= p <= 1")
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -q * np.log2(q) - (1 - q) * np.log2(1 - q)
    h = np.where((q == 0) | (q == 1), 0.0, h)
    return float(h) if h.ndim == 0 else h


def segment_parities(bits: U8, starts: Index) -> U8:
    """Parity of each segment ``bits[starts[i]:starts[i+1]]`` (segments non-empty)."""
    if not len(starts):
        return np.zeros(0, dtype=np.uint8)
    return np.bitwise_xor.reduceat(bits, starts) & 1


def _gather_ranges(lo: Index, hi: Index) -> tuple[Index, Index]:
    """Concatenated ``arange(lo[i], hi[i])`` and where each range starts in it."""
    lengths = hi - lo
    starts = np.cumsum(lengths) - lengths
    idx = np.arange(int(lengths.sum()), dtype=np.intp) + np.repeat(lo - starts, lengths)
    return idx, starts


class ParityChannel(Protocol):
    """What Bob's Cascade needs from Alice: parities of named positions, and one hash."""

    def parities(self, indices: Index, starts: Index) -> U8: ...

    def hash_tag(self, seed_bits: U8, tag_bits: int) -> U8: ...


class CascadeAlice:
    """Alice's side of Cascade: answers parity queries on her key, counting what it discloses.

    A query is ``(indices, starts)``: the parity of ``key[indices[s:e]]`` for
    each segment. It is self-contained (Bob chose and names the permutation),
    so this object holds no protocol state and can sit behind any transport.
    ``leaked_bits`` is exactly the number of bits it has answered.
    """

    def __init__(self, key: npt.ArrayLike):
        self._key = _as_bits(key, "Alice's key").copy()
        self.leaked_bits = 0
        self.n_queries = 0

    def __len__(self) -> int:
        return len(self._key)

    def parities(self, indices: Index, starts: Index) -> U8:
        """One message: the parity of every segment of ``key[indices]`` that ``starts`` delimits."""
        indices = np.asarray(indices, dtype=np.intp)
        starts = np.asarray(starts, dtype=np.intp)
        n = len(self._key)
        if indices.ndim != 1 or starts.ndim != 1:
            raise QueryError("a parity query is two 1-D index arrays")
        if len(starts):
            if starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= len(indices):
                raise QueryError("parity query segments must be non-empty and cover the indices")
            if indices.min() < 0 or indices.max() >= n:
                raise QueryError("parity query names a position outside the key")
        elif len(indices):
            raise QueryError("parity query with positions but no segments")
        self.n_queries += 1
        self.leaked_bits += len(starts)
        return segment_parities(self._key[indices], starts)

    def hash_tag(self, seed_bits: U8, tag_bits: int) -> U8:
        """A Toeplitz hash of the whole key under Bob's public seed, to verify the correction."""
        seed_bits = np.asarray(seed_bits)
        if tag_bits < 0 or seed_bits.shape != (len(self._key) + tag_bits - 1,) or np.any(seed_bits > 1):
            raise QueryError("hash query with a seed that does not fit the key")
        self.n_queries += 1
        self.leaked_bits += tag_bits
        return toeplitz_hash(self._key, tag_bits, seed_bits)


def _max_block(n: int) -> int:
    """Half the key: a pass needs two blocks at least, or it can see no error pair."""
    return max(1, n // 2)


def first_block_size(qber: float, n: int) -> int:
    """Cascade's first block, ceil(0.73 / QBER), at most half the key."""
    e = max(float(qber), MIN_BLOCK_QBER)
    return max(1, min(_max_block(n), math.ceil(BLOCK_FACTOR / e)))


class _Pass:
    """One Cascade pass: its permutation, block size, Alice's known parities, Bob's parities."""

    def __init__(self, perm: Index, block: int, alice_top: U8, bob_top: U8):
        n = len(perm)
        self.perm = perm
        self.block = block
        self.block_of = np.empty(n, dtype=np.intp)
        self.block_of[perm] = np.arange(n, dtype=np.intp) // block
        self.bob = bob_top
        # Alice's parity of every node of each block's binary-search tree
        # (heap numbering, root 1; -1 = never disclosed).
        depth = max(1, (block - 1).bit_length())  # ceil(log2 block): the deepest split
        self.tree = np.full((len(alice_top), 2 << depth), -1, dtype=np.int8)
        self.tree[:, 1] = alice_top

    def odd_blocks(self) -> Index:
        return np.flatnonzero(self.tree[:, 1] != self.bob)


def _binary_search(p: _Pass, blocks: Index, bob: U8, alice: ParityChannel, n: int) -> Index:
    """Locate one error in each of ``blocks`` (all odd), in lock-step: one message per level."""
    lo = blocks * p.block
    hi = np.minimum(lo + p.block, n)
    node = np.ones(len(blocks), dtype=np.intp)
    active = np.flatnonzero(hi - lo > 1)
    while active.size:
        b, a_lo, a_hi, a_node = blocks[active], lo[active], hi[active], node[active]
        mid = a_lo + (a_hi - a_lo) // 2
        left = 2 * a_node
        ask = np.flatnonzero(p.tree[b, left] < 0)
        if ask.size:
            idx, starts = _gather_ranges(a_lo[ask], mid[ask])
            answer = alice.parities(p.perm[idx], starts).astype(np.int8)
            p.tree[b[ask], left[ask]] = answer
            p.tree[b[ask], left[ask] + 1] = p.tree[b[ask], a_node[ask]] ^ answer
        idx, starts = _gather_ranges(a_lo, mid)
        bob_left = segment_parities(bob[p.perm[idx]], starts).astype(np.int8)
        go_left = p.tree[b, left] != bob_left
        hi[active] = np.where(go_left, mid, a_hi)
        lo[active] = np.where(go_left, a_lo, mid)
        node[active] = np.where(go_left, left, left + 1)
        active = active[hi[active] - lo[active] > 1]
    return p.perm[lo]


class _Counted:
    """Bob's ledger of what he asked: the leak as the sender of the questions sees it."""

    def __init__(self, alice: ParityChannel):
        self._alice = alice
        self.leaked_bits = 0
        self.n_queries = 0

    def parities(self, indices: Index, starts: Index) -> U8:
        self.leaked_bits += len(starts)
        self.n_queries += 1
        return np.asarray(self._alice.parities(indices, starts), dtype=np.uint8)

    def hash_tag(self, seed_bits: U8, tag_bits: int) -> U8:
        self.leaked_bits += tag_bits
        self.n_queries += 1
        return np.asarray(self._alice.hash_tag(seed_bits, tag_bits), dtype=np.uint8)


def cascade(
    bob_key: npt.ArrayLike,
    alice: ParityChannel,
    qber: float,
    *,
    rng: np.random.Generator,
    passes: int = CASCADE_PASSES,
    verify_bits: int = VERIFY_BITS,
    max_extra_passes: int = 8,
) -> CascadeResult:
    """Correct Bob's key towards Alice's, asking ``alice`` for parities.

    ``qber`` (Bob's estimate) sets the first block size. Each binary search
    runs over all odd blocks of one pass at once, so the number of messages
    grows with the depth of the cascade, not with the number of errors. With
    ``verify_bits`` > 0 Bob finally compares a Toeplitz hash of that many bits
    under a fresh public seed (a universal family: two different keys collide
    with probability 2^-verify_bits); while it differs he runs another pass
    and checks again (fresh seed, the tag counted again), up to
    ``max_extra_passes`` times, then raises :class:`ReconciliationError`.
    Extra passes are for short keys, where a few blocks can hide an even
    number of errors in every pass; long keys are clean after four.
    Returns the corrected key (a copy), the bits Alice disclosed (parities
    and hashes), and the number of messages Bob sent.
    """
    bob = _as_bits(bob_key, "Bob's key").copy()
    n = len(bob)
    if passes < 1:
        raise LocalError("Cascade needs at least one pass")
    if verify_bits < 0:
        raise LocalError("verify_bits must be >= 0")
    ask = _Counted(alice)
    if n:
        done: list[_Pass] = []
        block = first_block_size(qber, n)
        for _ in range(passes):
            block = _run_pass(done, block, bob, ask, rng)
        extra = 0
        while verify_bits and not _verified(bob, ask, verify_bits, rng):
            if extra == max_extra_passes:
                raise ReconciliationError("keys still differ after Cascade")
            block = _run_pass(done, block, bob, ask, rng)
            extra += 1
    return CascadeResult(bob, ask.leaked_bits, ask.n_queries)


def _run_pass(done: list[_Pass], block: int, bob: U8, alice: ParityChannel, rng: np.random.Generator) -> int:
    """One pass at this block size, corrected to the end; returns the next pass's block size."""
    n = len(bob)
    perm = rng.permutation(n).astype(np.intp)
    starts = np.arange(0, n, block, dtype=np.intp)
    alice_top = alice.parities(perm, starts)
    done.append(_Pass(perm, block, alice_top, segment_parities(bob[perm], starts)))
    _settle(done, bob, alice, n)
    return min(2 * block, _max_block(n))


def _verified(bob: U8, alice: ParityChannel, tag_bits: int, rng: np.random.Generator) -> bool:
    seed = rng.integers(0, 2, len(bob) + tag_bits - 1, dtype=np.uint8)
    return bool(np.array_equal(alice.hash_tag(seed, tag_bits), toeplitz_hash(bob, tag_bits, seed)))


def _settle(done: list[_Pass], bob: U8, alice: ParityChannel, n: int) -> None:
    """Correct until no block of any pass so far has a parity mismatch (the cascade effect).

    The pass with the smallest blocks goes first: its searches are cheapest.
    Blocks of one pass are disjoint, so all of its odd blocks are searched at
    once and each yields a different error.
    """
    while True:
        for p in done:
            odd = p.odd_blocks()
            if odd.size:
                break
        else:
            return
        flips = _binary_search(p, odd, bob, alice, n)
        bob[flips] ^= 1
        for q in done:
            q.bob ^= (np.bincount(q.block_of[flips], minlength=len(q.bob)) & 1).astype(np.uint8)


# --- privacy amplification ------------------------------------------------


def toeplitz_matrix(seed_bits: npt.ArrayLike, n: int, out_len: int) -> U8:
    """The out_len × n Toeplitz matrix ``T[i, j] = seed[i - j + n - 1]`` (reference only)."""
    seed = _as_bits(seed_bits, "seed")
    if len(seed) != n + out_len - 1:
        raise LocalError(f"a {out_len}×{n} Toeplitz matrix needs {n + out_len - 1} seed bits")
    i = np.arange(out_len)[:, None]
    j = np.arange(n)[None, :]
    return seed[i - j + n - 1]


def toeplitz_hash_reference(bits: npt.ArrayLike, out_len: int, seed_bits: npt.ArrayLike) -> U8:
    """The plain matrix product T·x mod 2 that :func:`toeplitz_hash` must equal."""
    x = _as_bits(bits, "bits")
    t = toeplitz_matrix(seed_bits, len(x), out_len).astype(np.int64)
    return ((t @ x.astype(np.int64)) & 1).astype(np.uint8)


def toeplitz_hash(bits: npt.ArrayLike, out_len: int, seed_bits: npt.ArrayLike) -> U8:
    """``T·x`` over GF(2) for the Toeplitz matrix ``T[i, j] = seed[i - j + n - 1]``.

    ``seed_bits`` has ``len(bits) + out_len - 1`` bits. The product is a
    convolution, ``y_i = (seed * x)[i + n - 1]``, computed exactly in blocks
    of B columns and rows: each B×B block of T depends only on its diagonal,
    so the FFTs of the seed pieces (one per diagonal) and of the input pieces
    are taken once and multiplied pairwise (overlap-save, 2B points). Integer
    sums stay below n, far inside float64's exact range, and are rounded
    before the parity is taken.
    """
    x = _as_bits(bits, "bits")
    seed = _as_bits(seed_bits, "seed")
    n = len(x)
    if out_len < 0:
        raise LocalError("out_len must be >= 0")
    if len(seed) != n + out_len - 1 and not (n == 0 and out_len == 0):
        raise LocalError(f"hashing {n} bits to {out_len} needs {n + out_len - 1} seed bits")
    if n == 0 or out_len == 0:
        return np.zeros(out_len, dtype=np.uint8)
    block = min(_TOEPLITZ_BLOCK, 1 << max(n, out_len).bit_length())
    cols, rows = -(-n // block), -(-out_len // block)
    n_pad, m_pad = cols * block, rows * block
    # Zeros before x keep every seed index (i - j + n - 1 is unchanged); zeros
    # after the seed cover the padded rows and columns.
    xp = np.zeros(n_pad, dtype=np.float64)
    xp[n_pad - n :] = x
    sp = np.zeros(n_pad + m_pad, dtype=np.float64)
    sp[: len(seed)] = seed
    fx = np.fft.rfft(xp.reshape(cols, block), 2 * block, axis=1)
    # Diagonal d = r - c in [-(cols-1), rows-1] uses seed[n_pad - B + d·B : ... + 2B].
    diag_starts = n_pad - block + np.arange(-(cols - 1), rows) * block
    seg = sp[diag_starts[:, None] + np.arange(2 * block)[None, :]]
    fs = np.fft.rfft(seg, axis=1)
    out = np.empty(m_pad, dtype=np.uint8)
    c = np.arange(cols)
    for r in range(rows):
        acc = np.einsum("ck,ck->k", fs[r - c + cols - 1], fx)
        y = np.fft.irfft(acc, 2 * block)[block - 1 : 2 * block - 1]
        rounded = np.rint(y)
        if np.abs(y - rounded).max(initial=0.0) > 0.25:  # never expected: float64 is exact here
            raise ArithmeticError("Toeplitz FFT lost integer precision")
        out[r * block : (r + 1) * block] = rounded.astype(np.int64) & 1
    return out[:out_len]


# --- key length -------------------------------------------------------------


def phase_error_deviation(n_key: int, n_sample: int, eps_pe: float) -> float:
    """μ such that the key's phase-error rate exceeds the sample's error rate + μ w.p. ≤ eps_pe².

    Serfling's bound for sampling k of n + k bits without replacement, as in
    Tomamichel et al. 2012: μ = sqrt((n + k)/(n k) · (k + 1)/k · ln(1/eps_pe)).
    """
    if n_key <= 0 or n_sample <= 0:
        return math.inf
    n, k = n_key, n_sample
    return math.sqrt((n + k) / (n * k) * (k + 1) / k * math.log(1 / eps_pe))


def final_key_length(
    n_sifted: int,
    qber: float,
    leaked_ec: int,
    *,
    n_sample: int | None = None,
    eps_sec: float = 1e-10,
    eps_pe: float = 1e-10,
) -> int:
    """Secret bits extractable from ``n_sifted`` key bits (the estimation sample already removed).

    Without ``n_sample``: the asymptotic (Shor–Preskill) length
    ``n(1 - h(e)) - leak_EC``, with the phase-error rate equal to the QBER e.

    With ``n_sample`` = k (the size of the random sample e was measured on):
    the finite-size length ``n(1 - h(e + μ)) - leak_EC - 2 log2(1/eps_sec)``,
    μ from :func:`phase_error_deviation` (the phase error of the key bits is
    bounded from the sample by the uncertainty relation, except with
    probability eps_pe²), and ``2 log2(1/eps_sec)`` the leftover-hash cost of
    Toeplitz hashing. The key is then secret up to about 2·eps_pe + eps_sec.
    ``leaked_ec`` must hold every bit disclosed during error correction,
    the verification hash included (so no separate eps_cor term).
    Never negative; rounded down.
    """
    if n_sifted < 0 or leaked_ec < 0 or not 0 <= qber <= 1:
        raise LocalError("need n_sifted >= 0, leaked_ec >= 0 and 0 <= qber <= 1")
    if n_sifted == 0:
        return 0
    if n_sample is None:
        e, penalty = qber, 0.0
    else:
        if not (0 < eps_sec < 1 and 0 < eps_pe < 1):
            raise LocalError("security parameters must lie in (0, 1)")
        e = qber + phase_error_deviation(n_sifted, n_sample, eps_pe)
        penalty = 2 * math.log2(1 / eps_sec)
    if e >= 0.5:
        return 0
    length = n_sifted * (1 - binary_entropy(e)) - leaked_ec - penalty
    return max(0, math.floor(length))
