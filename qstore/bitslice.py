"""The bit-sliced layout of share data and the GF(2^8) linear-map kernel.

Sharing, reconstruction, verification and repair are all one operation: each
output buffer is a GF(2^8)-linear combination of input buffers, byte position
by byte position (``out[o] = sum_i C[o][i] * in[i]``). This module computes
that operation fast.

Layout
------
A buffer of ``L`` bytes is read as ``L`` field elements, but not byte by byte:
its first ``L // BLOCK * BLOCK`` bytes form blocks of ``BLOCK`` = 16384 bytes,
each made of 8 bit planes of ``PLANE`` = 2048 bytes, and element ``j`` of a
block (0 <= j < 16384) has bit ``q`` equal to bit ``j % 8`` of byte
``q * PLANE + j // 8`` of the block. The last ``L % BLOCK`` bytes (the tail)
are elements one byte each. The map from bytes to elements is a fixed
bijection, so Shamir sharing of the elements is Shamir sharing of the data,
with the same perfect secrecy; the layout only decides which bits form an
element. :func:`to_elements` and :func:`from_elements` spell it out and are
what the reference implementation in the tests uses.

Why: multiplication by a constant ``c`` is the 8x8 bit matrix
:func:`qstore.gf256.bit_matrix`, so in this layout ``c * y`` is computed by
XORing whole 2 KiB planes of ``y`` into planes of the output: no tables,
no shifts, no per-byte work, and the compiler turns the XOR loops into wide
SIMD. No transposition is ever done on the data path.

Backends: ``numba`` (compiled on first use and cached on disk) and
``numpy`` (pure numpy, always available). :func:`default_backend` picks
numba when it imports, unless ``QSTORE_KERNEL=numpy`` is set.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import cache
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

from qstore import gf256

BLOCK = 16384
PLANE = BLOCK // 8
WORDS = PLANE // 8  # uint64 words in a plane
BLOCK_WORDS = BLOCK // 8
SEGMENT = 4 * BLOCK  # bytes of every input processed per kernel call: stays in L2

Backend = Literal["numba", "numpy"]
U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]
Kernel = Callable[..., None]


class RandomSource(Protocol):
    """Anything that fills a writable buffer with uniform random bytes."""

    def fill(self, out: memoryview) -> None: ...


def to_elements(buf: bytes | bytearray | memoryview | U8) -> U8:
    """The field elements a buffer holds, in element order (reference code, slow)."""
    data = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
    head = len(data) // BLOCK * BLOCK
    blocks = data[:head].reshape(-1, 8, PLANE)
    # bits[b, q, j] = bit j of plane q of block b, little-endian within bytes.
    bits = np.unpackbits(blocks, axis=2, bitorder="little")
    weights = (1 << np.arange(8, dtype=np.uint8)).reshape(1, 8, 1)
    elements = (bits * weights).sum(axis=1, dtype=np.uint8).reshape(-1)
    return np.concatenate([elements, data[head:]])


def from_elements(elements: U8) -> bytes:
    """Inverse of :func:`to_elements`."""
    elements = np.asarray(elements, dtype=np.uint8)
    head = len(elements) // BLOCK * BLOCK
    el = elements[:head].reshape(-1, 1, BLOCK)
    bits = (el >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    planes = np.packbits(bits, axis=2, bitorder="little")
    return planes.tobytes() + elements[head:].tobytes()


def elements_at(buf: U8, positions: npt.NDArray[np.intp]) -> U8:
    """The elements of ``buf`` at the given element positions (any order)."""
    length = len(buf)
    head = length // BLOCK * BLOCK
    positions = np.asarray(positions, dtype=np.intp)
    out = np.zeros(len(positions), dtype=np.uint8)
    in_tail = positions >= head
    out[in_tail] = buf[positions[in_tail]]
    p = positions[~in_tail]
    base = p // BLOCK * BLOCK + (p % BLOCK) // 8
    shift = (p % 8).astype(np.uint8)
    acc = np.zeros(len(p), dtype=np.uint8)
    for q in range(8):
        acc |= ((buf[base + q * PLANE] >> shift) & 1) << q
    out[~in_tail] = acc
    return out


def nonzero_elements(buf: U8) -> npt.NDArray[np.bool_]:
    """Mask of the element positions of ``buf`` that are not zero."""
    length = len(buf)
    head = length // BLOCK * BLOCK
    planes = buf[:head].reshape(-1, 8, PLANE)
    any_bit = np.bitwise_or.reduce(planes, axis=1)
    mask = np.unpackbits(any_bit, axis=1, bitorder="little").reshape(-1).astype(bool)
    return np.concatenate([mask, buf[head:] != 0])


def empty_rows(rows: int, length: int) -> U8:
    """An uninitialised (rows, length) array whose rows start 8-byte aligned."""
    stride = -(-length // 64) * 64
    return np.empty((rows, max(stride, 64)), dtype=np.uint8)[:, :length]


def _plane_terms(matrix: Sequence[Sequence[int]]) -> tuple[I64, I64]:
    """For each output o and output plane r, the input planes to XOR.

    An input plane is numbered ``8 * i + q`` (input i, plane q).
    """
    n_out, n_in = len(matrix), len(matrix[0])
    qidx = np.zeros((n_out, 8, 8 * n_in), dtype=np.int64)
    qcnt = np.zeros((n_out, 8), dtype=np.int64)
    for o, row in enumerate(matrix):
        bits = np.concatenate([gf256.bit_matrix(c) for c in row], axis=1)  # (8, 8 * n_in)
        for r in range(8):
            planes = np.flatnonzero(bits[r])
            qcnt[o, r] = len(planes)
            qidx[o, r, : len(planes)] = planes
    return qidx, qcnt


def _kernel_numpy(
    src: npt.NDArray[np.uint64], nblocks: int, qidx: I64, qcnt: I64,
    dst: npt.NDArray[np.uint64], dst_off: int,
) -> None:
    """Reference kernel: same contract as the compiled one, vectorised over blocks."""
    s = src[:, : nblocks * BLOCK_WORDS].reshape(src.shape[0], nblocks, 8, WORDS)
    for o in range(qcnt.shape[0]):
        d = dst[o, dst_off : dst_off + nblocks * BLOCK_WORDS].reshape(nblocks, 8, WORDS)
        for r in range(8):
            plane = d[:, r, :]
            cnt = int(qcnt[o, r])
            if cnt == 0:
                plane[...] = 0
                continue
            p = int(qidx[o, r, 0])
            np.copyto(plane, s[p >> 3, :, p & 7, :])
            for t in range(1, cnt):
                p = int(qidx[o, r, t])
                plane ^= s[p >> 3, :, p & 7, :]


def _kernel_numba() -> Kernel:
    from qstore._jit import kernel

    return kernel


@cache
def numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def default_backend() -> Backend:
    """numba when it imports, unless QSTORE_KERNEL=numpy asks for the fallback."""
    wanted = os.environ.get("QSTORE_KERNEL", "").strip().lower()
    if wanted == "numpy" or not numba_available():
        return "numpy"
    return "numba"


def _kernel(backend: Backend) -> Kernel:
    if backend == "numba":
        return _kernel_numba()
    if backend == "numpy":
        return _kernel_numpy
    raise ValueError(f"unknown kernel backend {backend!r}")


class LinearMap:
    """``out[o] = sum_i matrix[o][i] * in[i]`` over GF(2^8), in the bit-sliced layout.

    A primitive (hazmat): it knows nothing of shares or secrecy. Build it once
    per matrix (the plane tables are precomputed) and apply it to any number
    of buffers.
    """

    def __init__(self, matrix: Sequence[Sequence[int]], backend: Backend | None = None):
        rows = [[int(v) for v in r] for r in matrix]
        if not rows or not rows[0] or any(len(r) != len(rows[0]) for r in rows):
            raise ValueError("matrix must be a non-empty rectangle")
        if any(not 0 <= v < 256 for r in rows for v in r):
            raise ValueError("matrix entries must be field elements (0..255)")
        self.matrix = rows
        self.n_out = len(rows)
        self.n_in = len(rows[0])
        self.backend: Backend = backend or default_backend()
        self._kernel = _kernel(self.backend)
        self._qidx, self._qcnt = _plane_terms(rows)
        # Tail (byte-wise) tables: _tail[i][o] multiplies by matrix[o][i].
        self._tail = [gf256.MUL[[r[i] for r in rows]] for i in range(self.n_in)]

    def apply(
        self,
        sources: Sequence[U8 | None],
        out: U8,
        rng: RandomSource | None = None,
    ) -> None:
        """out = matrix @ sources; a ``None`` source is fresh randomness from ``rng``.

        Every source is a uint8 array of the same length L as the rows of
        ``out`` (from :func:`empty_rows`). Randomness is drawn segment by
        segment, so it never exists for the whole buffer at once.
        """
        if len(sources) != self.n_in:
            raise ValueError(f"expected {self.n_in} sources, got {len(sources)}")
        if out.ndim != 2 or out.shape[0] != self.n_out or out.dtype != np.uint8:
            raise ValueError("out must be a (n_out, L) uint8 array")
        length = out.shape[1]
        if any(s is not None and len(s) != length for s in sources):
            raise ValueError("sources and outputs differ in length")
        if any(s is None for s in sources) and rng is None:
            raise ValueError("random sources need an rng")
        if out.strides[1] != 1 or out.strides[0] % 8 or out.ctypes.data % 8:
            raise ValueError("out rows must be contiguous and 8-byte aligned (use empty_rows)")
        head = length // BLOCK * BLOCK
        seg = min(SEGMENT, max(length, 1))
        stage = np.empty((self.n_in, -(-seg // 8)), dtype=np.uint64)
        stage8 = stage.view(np.uint8)
        dst = out[:, : length // 8 * 8].view(np.uint64)
        for start in range(0, length, seg):
            stop = min(length, start + seg)
            size = stop - start
            for i, src in enumerate(sources):
                if src is None:
                    rng.fill(memoryview(stage8[i, :size]))  # type: ignore[union-attr]
                else:
                    stage8[i, :size] = src[start:stop]
            full = (min(stop, head) - start) // BLOCK if start < head else 0
            if full:
                self._kernel(stage, full, self._qidx, self._qcnt, dst, start // 8)
            lo = start + full * BLOCK
            if lo < stop:
                self._apply_tail(stage8[:, lo - start : size], out[:, lo:stop])

    def _apply_tail(self, src: U8, out: U8) -> None:
        np.copyto(out, self._tail[0][:, src[0]])
        for i in range(1, self.n_in):
            out ^= self._tail[i][:, src[i]]
