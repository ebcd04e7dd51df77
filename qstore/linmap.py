"""GF(2^8) linear maps over byte buffers: the one kernel behind sharing.

Sharing, reconstruction, checking and repair are all the same operation:
each output buffer is a GF(2^8)-linear combination of input buffers, byte
position by byte position::

    out[o][p] = sum_i matrix[o][i] * in[i][p]

Splitting is the Vandermonde matrix applied to (secret, random coefficients),
combining is a row of Lagrange weights applied to k shares, rebuilding a
lost share is Lagrange weights at its x. Byte p of every buffer is one field
element: this is textbook Shamir sharing, byte-compatible with any other
implementation over GF(2^8) mod 0x11B with x-coordinates 1..n.

Backends (``qstore._simd`` compiles the machine-code ones for the host CPU):

* ``gfni512`` / ``gfni256``: the GFNI instruction ``vgf2p8mulb``, 64 or 32
  multiplications per instruction;
* ``avx2``: split-nibble ``vpshufb`` tables, for CPUs without GFNI;
* ``numpy``: product-table lookups, pure numpy, always available: the
  reference the others are tested against.

:func:`default_backend` takes the best one the CPU has, unless the
environment variable ``QSTORE_KERNEL`` names another.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

from qstore import gf256
from qstore.rng import RandomSource

Backend = Literal["gfni512", "gfni256", "avx2", "numpy"]
BACKENDS: tuple[Backend, ...] = ("gfni512", "gfni256", "avx2", "numpy")
SEGMENT = 1 << 18  # random bytes per source drawn per kernel call: they stay in L2
_NUMPY_PIECE = 1 << 20  # bounds the temporaries of table lookups
U8 = npt.NDArray[np.uint8]


def available_backends() -> list[Backend]:
    """Backends this machine can run, best first (numpy always last)."""
    from qstore import _simd

    return [*_simd.available(), "numpy"]  # type: ignore[list-item]


def default_backend() -> Backend:
    """The best backend here, or the one QSTORE_KERNEL names."""
    wanted = os.environ.get("QSTORE_KERNEL", "").strip().lower()
    have = available_backends()
    if wanted:
        if wanted not in have:
            raise ValueError(f"QSTORE_KERNEL={wanted!r} is not one of {', '.join(have)} on this machine")
        return wanted  # type: ignore[return-value]
    return have[0]


def empty_rows(rows: int, length: int) -> U8:
    """An uninitialised (rows, length) uint8 array whose rows start 64-byte aligned."""
    stride = max(-(-length // 64) * 64, 64)
    raw = np.empty(rows * stride + 64, dtype=np.uint8)
    skip = -raw.ctypes.data % 64
    return raw[skip : skip + rows * stride].reshape(rows, stride)[:, :length]


class LinearMap:
    """``out[o] = sum_i matrix[o][i] * in[i]`` over GF(2^8), byte by byte.

    A primitive (hazmat): it knows nothing of shares or secrecy. Build it once
    per matrix and apply it to any number of buffers.
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
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown kernel backend {self.backend!r}")
        coef = np.array(rows, dtype=np.uint8).reshape(-1)
        # Product tables for the numpy path and for tails: _tables[i][o] = MUL[matrix[o][i]].
        self._tables = [gf256.MUL[[r[i] for r in rows]] for i in range(self.n_in)]
        self._kernel = self._streaming = None
        if self.backend != "numpy":
            from qstore import _simd

            self._kernel = _simd.compile_kernel(self.backend)
            self._streaming = _simd.compile_kernel(self.backend, streaming=True)
            self._coef = _simd.nibble_tables(coef) if self.backend == "avx2" else coef

    def apply(self, sources: Sequence[U8 | None], out: U8, rng: RandomSource | None = None) -> None:
        """out = matrix @ sources; a ``None`` source is fresh randomness from ``rng``.

        Every source is a uint8 array as long as the rows of ``out``.
        Randomness is drawn segment by segment into a small buffer that stays
        in cache, so it never exists for the whole buffer at once.
        """
        if len(sources) != self.n_in:
            raise ValueError(f"expected {self.n_in} sources, got {len(sources)}")
        if out.ndim != 2 or out.shape[0] != self.n_out or out.dtype != np.uint8 or out.strides[1] != 1:
            raise ValueError("out must be a (n_out, L) uint8 array with contiguous rows")
        length = out.shape[1]
        srcs = [None if s is None else np.ascontiguousarray(s, dtype=np.uint8) for s in sources]
        if any(s is not None and s.shape != (length,) for s in srcs):
            raise ValueError("sources and outputs differ in length")
        random_rows = [i for i, s in enumerate(srcs) if s is None]
        if random_rows and rng is None:
            raise ValueError("random sources need an rng")
        if length == 0:
            return
        if not random_rows:
            self._apply(srcs, out)  # type: ignore[arg-type]
            return
        n_rand = len(random_rows)
        stage = np.empty((n_rand, min(SEGMENT, length)), dtype=np.uint8)
        try:
            for n, lo in enumerate(range(0, length, SEGMENT)):
                hi = min(length, lo + SEGMENT)
                rows = []
                for r in range(n_rand):
                    row = stage[r, : hi - lo]
                    # Row r of segment n is always the same part of the stream.
                    rng.fill(memoryview(row), (n * n_rand + r) * SEGMENT)  # type: ignore[union-attr]
                    rows.append(row)
                it = iter(rows)
                self._apply([next(it) if s is None else s[lo:hi] for s in srcs], out[:, lo:hi])
        finally:
            stage.fill(0)  # coefficients are as secret as the data

    def _apply(self, srcs: Sequence[U8], out: U8) -> None:
        length = out.shape[1]
        done = 0
        if self._kernel is not None and length >= self._kernel.group:
            groups = length // self._kernel.group
            src_ptrs = np.array([s.ctypes.data for s in srcs], dtype=np.int64)
            dst_ptrs = out[:, 0].ctypes.data + np.arange(self.n_out, dtype=np.int64) * out.strides[0]
            aligned = not (dst_ptrs % self._kernel.width).any()
            kernel = self._streaming if aligned else self._kernel
            kernel.fn(
                src_ptrs.ctypes.data, dst_ptrs.ctypes.data, self._coef.ctypes.data,
                self.n_in, self.n_out, groups,
            )
            done = groups * self._kernel.group
        for lo in range(done, length, _NUMPY_PIECE):
            hi = min(length, lo + _NUMPY_PIECE)
            piece = out[:, lo:hi]
            np.copyto(piece, self._tables[0][:, srcs[0][lo:hi]])
            for i in range(1, self.n_in):
                piece ^= self._tables[i][:, srcs[i][lo:hi]]
