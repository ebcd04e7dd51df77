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
from qstore._simd import GROUP
from qstore.rng import RandomSource

Backend = Literal["gfni512", "gfni256", "avx2", "numpy"]
BACKENDS: tuple[Backend, ...] = ("gfni512", "gfni256", "avx2", "numpy")
SEGMENT = 1 << 18  # bytes per source per step when the stream is drawn outside the kernel
_NUMPY_PIECE = 1 << 20  # bounds the temporaries of table lookups
U8 = npt.NDArray[np.uint8]


def available_backends() -> list[Backend]:
    """Backends this machine can run, best first (numpy always last)."""
    from qstore import _simd

    return [*_simd.available(), "numpy"]  # type: ignore[list-item]


def default_backend() -> Backend:
    """The best backend here, or the one QSTORE_KERNEL names."""
    wanted = os.environ.get("QSTORE_KERNEL", "").strip().lower()
    if wanted == "numpy":
        return "numpy"  # without even probing the CPU through llvmlite
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
        self._coef = coef
        if self.backend == "avx2":
            from qstore import _simd

            self._coef = _simd.nibble_tables(coef)

    def _compiled(self, streaming: bool, aes: str | None):  # -> qstore._simd.Kernel
        from qstore import _simd

        return _simd.compile_kernel(self.backend, streaming, aes)

    def apply(self, sources: Sequence[U8 | None], out: U8, rng: RandomSource | None = None) -> None:
        """out = matrix @ sources; a ``None`` source is fresh randomness from ``rng``.

        Every source is a uint8 array as long as the rows of ``out``. Random
        source r takes byte p from the generator's stream at
        ``base + ((p // GROUP) * n_rand + r) * GROUP + p % GROUP``, where
        ``base = rng.reserve(...)`` is a fresh part of the stream for every
        call. With a compiled kernel and :class:`~qstore.rng.AesCtrRandom`
        the kernel generates that keystream itself, group by group, in L1;
        otherwise it is drawn segment by segment. Either way the coefficients
        never exist for the whole buffer at once, and the result is the same.
        """
        if len(sources) != self.n_in:
            raise ValueError(f"expected {self.n_in} sources, got {len(sources)}")
        if out.ndim != 2 or out.shape[0] != self.n_out or out.dtype != np.uint8 or out.strides[1] != 1:
            raise ValueError("out must be a (n_out, L) uint8 array with contiguous rows")
        length = out.shape[1]
        srcs = [None if s is None else np.ascontiguousarray(s, dtype=np.uint8) for s in sources]
        if any(s is not None and s.shape != (length,) for s in srcs):
            raise ValueError("sources and outputs differ in length")
        n_rand = sum(s is None for s in srcs)
        if n_rand and rng is None:
            raise ValueError("random sources need an rng")
        if length == 0:
            return
        units = -(-length // GROUP)
        base = rng.reserve(units * n_rand * GROUP) if n_rand else 0  # type: ignore[union-attr]
        aes = getattr(rng, "kernel_state", lambda: None)() if n_rand else None
        if self.backend != "numpy" and (n_rand == 0 or aes is not None):
            self._apply_fused(srcs, out, n_rand, base, aes, rng)
        else:
            self._apply_segments(srcs, out, n_rand, base, rng)

    def _apply_fused(self, srcs, out, n_rand, base, aes, rng) -> None:
        """One kernel call for all whole groups (randomness made inside), then the tail."""
        scratch = np.zeros(max(n_rand, 1) * GROUP, dtype=np.uint8)
        try:
            done = self._kernel_groups(srcs, out, scratch, n_rand, base, aes)
            if done < out.shape[1]:
                self._apply_segments(srcs, out, n_rand, base, rng, start=done)
        finally:
            scratch.fill(0)  # coefficients are as secret as the data

    def _kernel_groups(self, srcs, out, scratch, n_rand, base, aes) -> int:
        """Run the compiled kernel over every whole group; return the bytes done.

        ``None`` sources read the scratch rows the kernel fills with keystream.
        """
        groups = out.shape[1] // GROUP
        if not groups:
            return 0
        dst = out[:, 0].ctypes.data + np.arange(self.n_out, dtype=np.int64) * out.strides[0]
        kernel = self._compiled(streaming=not (dst % 64).any(), aes=aes[0] if aes is not None else None)
        ptrs = np.zeros(self.n_in, dtype=np.int64)
        strides = np.zeros(self.n_in, dtype=np.int64)
        r = 0
        for i, s in enumerate(srcs):
            if s is None:
                ptrs[i] = scratch.ctypes.data + r * GROUP
                r += 1
            else:
                ptrs[i] = s.ctypes.data
                strides[i] = GROUP
        kernel.fn(
            ptrs.ctypes.data, strides.ctypes.data, dst.ctypes.data, self._coef.ctypes.data,
            self.n_in, self.n_out, groups,
            scratch.ctypes.data if n_rand else 0, n_rand, aes[1].ctypes.data if aes is not None else 0,
            base // 16,
        )
        return groups * GROUP

    def _apply_segments(self, srcs, out, n_rand, base, rng, start: int = 0) -> None:
        """Draw the coefficient stream segment by segment and apply the map to each."""
        length = out.shape[1]
        seg_units = SEGMENT // GROUP
        raw = np.empty(seg_units * n_rand * GROUP, dtype=np.uint8) if n_rand else None
        try:
            for lo in range(start, length, SEGMENT):
                hi = min(length, lo + SEGMENT)
                units = -(-(hi - lo) // GROUP)
                rows: list[U8] = []
                if n_rand:
                    stream = raw[: units * n_rand * GROUP]  # type: ignore[index]
                    rng.fill(memoryview(stream), base + lo // GROUP * n_rand * GROUP)
                    # (unit, row, byte) -> (row, unit, byte): row r's coefficients, in order
                    by_row = stream.reshape(units, n_rand, GROUP).transpose(1, 0, 2).reshape(n_rand, -1)
                    rows = list(by_row[:, : hi - lo])
                it = iter(rows)
                self._apply([next(it) if s is None else s[lo:hi] for s in srcs], out[:, lo:hi])
        finally:
            if raw is not None:
                raw.fill(0)

    def _apply(self, srcs: Sequence[U8], out: U8) -> None:
        """out = matrix @ srcs for fully materialised sources."""
        length = out.shape[1]
        done = 0 if self.backend == "numpy" else self._kernel_groups(srcs, out, None, 0, 0, None)
        for lo in range(done, length, _NUMPY_PIECE):
            hi = min(length, lo + _NUMPY_PIECE)
            piece = out[:, lo:hi]
            np.copyto(piece, self._tables[0][:, srcs[0][lo:hi]])
            for i in range(1, self.n_in):
                piece ^= self._tables[i][:, srcs[i][lo:hi]]
