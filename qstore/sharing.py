"""Shamir secret sharing of byte strings and streams over GF(2^8).

Every byte of the data is the constant term of its own random polynomial of
degree k-1 over GF(2^8); share x holds the polynomials' values at x, for
x = 1..n. Any k shares determine the data; any k-1 are uniformly distributed
whatever the data (perfect secrecy, given uniform coefficients: see
:mod:`qstore.rng`).

A share is exactly as long as the data it hides: no padding, no header.
Framing (object id, chunk index, digest) is :mod:`qstore.framing`'s job.

Streams are split chunk by chunk with fresh randomness per chunk. Byte p of
a share belongs to byte p of the data, so the concatenated shares of a
stream are the shares of the whole file and any chunk size combines them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import BinaryIO

import numpy as np

from qstore import gf256
from qstore.errors import DuplicateShare, MixedShares, NotEnoughShares, ParameterError, ShareError
from qstore.linmap import U8, Backend, LinearMap, empty_rows
from qstore.rng import AesCtrRandom, RandomSource

MAX_SHARES = 255
DEFAULT_CHUNK = 4 * 1024 * 1024
MAX_CHUNK = 64 * 1024 * 1024
Progress = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class Share:
    """One share: the values at ``x`` of the polynomials hiding some data.

    ``k`` is the threshold of the split the share came from; ``data`` is as
    long as the secret.
    """

    x: int
    data: bytes = field(repr=False)
    k: int

    def __post_init__(self) -> None:
        if not isinstance(self.x, int) or not 1 <= self.x <= MAX_SHARES:
            raise ShareError(f"share x must be in 1..{MAX_SHARES}")
        if not isinstance(self.k, int) or not 2 <= self.k <= MAX_SHARES:
            raise ShareError(f"share threshold k must be in 2..{MAX_SHARES}")


def check_parameters(n: int, k: int) -> None:
    """Raise ParameterError unless 2 <= k <= n <= 255."""
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, k)):
        raise ParameterError("n and k must be integers")
    if not 2 <= k <= n <= MAX_SHARES:
        raise ParameterError(f"need 2 <= k <= n <= {MAX_SHARES}, got k={k}, n={n}")


@lru_cache(maxsize=64)
def split_map(n: int, k: int, backend: Backend | None = None) -> LinearMap:
    """The map (secret, a_1..a_{k-1}) -> shares at x = 1..n."""
    return LinearMap([gf256.vandermonde_row(x, k) for x in range(1, n + 1)], backend)


@lru_cache(maxsize=256)
def interpolation_map(
    xs: tuple[int, ...], targets: tuple[int, ...], backend: Backend | None = None
) -> LinearMap:
    """The map (shares at xs) -> values at each target (0 is the secret)."""
    return LinearMap([gf256.lagrange_weights(xs, at) for at in targets], backend)


def _as_array(data: bytes | bytearray | memoryview) -> U8:
    return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)


def split_into(
    data: bytes | bytearray | memoryview,
    n: int,
    k: int,
    out: U8,
    *,
    rng: RandomSource | None = None,
    backend: Backend | None = None,
) -> None:
    """Write the n shares of ``data`` into the rows of ``out`` (row i is x = i+1).

    The allocation-free primitive behind :func:`split` and the streaming
    paths; ``out`` comes from :func:`qstore.linmap.empty_rows`.
    """
    check_parameters(n, k)
    secret = _as_array(data)
    if out.shape != (n, len(secret)):
        raise ParameterError(f"out must have shape ({n}, {len(secret)})")
    sources: list[U8 | None] = [secret] + [None] * (k - 1)
    generator = rng or AesCtrRandom()
    try:
        split_map(n, k, backend).apply(sources, out, generator)
    finally:
        if rng is None:
            generator.wipe()


def split(
    data: bytes | bytearray | memoryview,
    n: int,
    k: int,
    *,
    rng: RandomSource | None = None,
    backend: Backend | None = None,
) -> list[Share]:
    """Split ``data`` into n shares, any k of which rebuild it.

    Randomness: a fresh AES-256-CTR generator keyed from os.urandom for this
    call, unless ``rng`` is given (``qstore.rng.OsRandom()`` for strict mode).
    """
    check_parameters(n, k)
    out = empty_rows(n, len(memoryview(data).cast("B")))
    split_into(data, n, k, out, rng=rng, backend=backend)
    return [Share(x=i + 1, data=out[i].tobytes(), k=k) for i in range(n)]


def check_shares(shares: Sequence[Share]) -> int:
    """Validate a set of shares for combining; return their common length."""
    if not shares:
        raise NotEnoughShares(2, 0)
    ks = {s.k for s in shares}
    if len(ks) != 1:
        raise MixedShares("shares come from splits with different thresholds")
    (k,) = ks
    seen: set[int] = set()
    for s in shares:
        if s.x in seen:
            raise DuplicateShare(s.x)
        seen.add(s.x)
    if len(shares) < k:
        raise NotEnoughShares(k, len(shares))
    lengths = {len(s.data) for s in shares}
    if len(lengths) != 1:
        raise MixedShares("shares differ in length")
    return lengths.pop()


def interpolate(
    shares: Sequence[Share],
    targets: Sequence[int] = (0,),
    backend: Backend | None = None,
    out: U8 | None = None,
) -> U8:
    """Values at ``targets`` of the polynomials through exactly these shares.

    No checking of extra shares: with k shares this is reconstruction
    (target 0) or the rebuilding of lost shares (targets = their x). The
    result goes into ``out`` (shape (len(targets), L)) when given, so that a
    streaming caller reuses one buffer.
    """
    arrays = [_as_array(s.data) for s in shares]
    return _interpolate([s.x for s in shares], arrays, targets, backend, out)


def _interpolate(
    xs: Sequence[int], arrays: Sequence[U8], targets: Sequence[int], backend: Backend | None,
    out: U8 | None = None,
) -> U8:
    if out is None:
        out = empty_rows(len(targets), len(arrays[0]))
    interpolation_map(tuple(xs), tuple(targets), backend).apply(arrays, out)
    return out


def combine(shares: Sequence[Share], *, backend: Backend | None = None) -> bytes:
    """Rebuild the data from k or more shares.

    With exactly k shares the data is interpolated. With more, every share
    is checked against the others and wrong shares are corrected by
    :func:`qstore.decoding.decode`; when they cannot be corrected,
    ShareCorruption is raised: wrong data is never returned silently. Use
    ``decode`` directly to learn which shares were bad.
    """
    check_shares(shares)
    k = shares[0].k
    if len(shares) == k:
        return interpolate(shares, (0,), backend)[0].tobytes()
    from qstore.decoding import decode

    return decode(shares, k, backend=backend).data


def _read_full(f: BinaryIO, buf: memoryview) -> int:
    """Fill ``buf`` from ``f`` unless EOF comes first; return bytes read."""
    got = 0
    while got < len(buf):
        r = f.readinto(buf[got:])  # type: ignore[attr-defined]
        if not r:
            break
        got += r
    return got


def _check_chunk(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or not 0 < chunk_size <= MAX_CHUNK:
        raise ParameterError(f"chunk size must be 1 to {MAX_CHUNK} bytes")


def split_stream(
    src: BinaryIO,
    outs: Sequence[BinaryIO],
    k: int,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    rng_factory: Callable[[], RandomSource] = AesCtrRandom,
    progress: Progress | None = None,
    backend: Backend | None = None,
) -> int:
    """Split a stream into ``len(outs)`` share streams (outs[i] gets x = i+1).

    Memory stays at about (n + 1) * chunk_size whatever the stream's length;
    the generator is re-keyed for every chunk. Returns the bytes read.
    """
    n = len(outs)
    check_parameters(n, k)
    _check_chunk(chunk_size)
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    rows = empty_rows(n, chunk_size)
    total = 0
    while True:
        got = _read_full(src, view)
        if got == 0 and total > 0:
            break
        out = rows if got == chunk_size else empty_rows(n, got)
        split_into(view[:got], n, k, out, rng=rng_factory(), backend=backend)
        for i, f in enumerate(outs):
            f.write(memoryview(out[i]))  # type: ignore[arg-type]
        total += got
        if progress:
            progress(got)
        if got < chunk_size:
            break
    return total


@dataclass(frozen=True)
class CombineReport:
    """What combine_stream did: bytes written and the x of shares found wrong."""

    size: int
    bad: tuple[int, ...] = ()


def combine_stream(
    sources: Sequence[tuple[int, BinaryIO]],
    out: BinaryIO,
    k: int,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    progress: Progress | None = None,
    backend: Backend | None = None,
) -> CombineReport:
    """Rebuild a stream from k or more share streams given as (x, stream).

    With more than k sources every chunk is checked and corrected (see
    :func:`combine`); the report names every share found wrong.
    """
    if len(sources) < k:
        raise NotEnoughShares(k, len(sources))
    check_parameters(max(len(sources), k), k)
    _check_chunk(chunk_size)
    xs = [x for x, _ in sources]
    if len(set(xs)) != len(xs):
        raise DuplicateShare(next(x for x in xs if xs.count(x) > 1))
    bufs = [bytearray(chunk_size) for _ in sources]
    row = empty_rows(1, chunk_size)
    bad: set[int] = set()
    total = 0
    while True:
        sizes = {_read_full(f, memoryview(b)) for (_, f), b in zip(sources, bufs, strict=True)}
        if len(sizes) != 1:
            raise MixedShares("share streams differ in length")
        got = sizes.pop()
        if got == 0:
            break
        if len(sources) == k:
            arrays = [np.frombuffer(b, dtype=np.uint8, count=got) for b in bufs]
            data: bytes | U8 = _interpolate(xs, arrays, (0,), backend, row[:, :got])[0]
        else:
            from qstore.decoding import decode

            shares = [Share(x=x, data=bytes(b[:got]), k=k) for x, b in zip(xs, bufs, strict=True)]
            result = decode(shares, k, backend=backend)
            bad.update(result.bad)
            data = result.data
        out.write(memoryview(data))  # type: ignore[arg-type]
        total += got
        if progress:
            progress(got)
        if got < chunk_size:
            break
    return CombineReport(size=total, bad=tuple(sorted(bad)))
