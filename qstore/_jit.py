"""The compiled twin of :func:`qstore.bitslice._kernel_numpy` (numba).

Imported only when the numba backend is first used, so importing qstore
stays cheap. The explicit signature compiles one machine-code version for
every array layout, and ``cache=True`` keeps it on disk between runs.
"""

import numba

from qstore.bitslice import BLOCK_WORDS, WORDS

_SIGNATURE = "void(uint64[:, ::1], int64, int64[:, :, ::1], int64[:, ::1], uint64[:, :], int64)"


@numba.njit(nogil=True, boundscheck=False, inline="always")
def _plane(src, p, sb):  # pragma: no cover - compiled
    s0 = sb + (p & 7) * WORDS
    return src[p >> 3, s0 : s0 + WORDS]


@numba.njit(_SIGNATURE, cache=True, nogil=True, boundscheck=False)
def kernel(src, nblocks, qidx, qcnt, dst, dst_off):  # pragma: no cover - compiled
    """dst[o, block b, plane r] = XOR of the src planes qidx[o, r, :qcnt[o, r]].

    Each output plane is written once; up to four input planes are XORed per
    pass so that the destination is loaded and stored rarely.
    """
    n_out = qcnt.shape[0]
    for b in range(nblocks):
        sb = b * BLOCK_WORDS
        db = dst_off + b * BLOCK_WORDS
        for o in range(n_out):
            row = dst[o]
            for r in range(8):
                d = row[db + r * WORDS : db + (r + 1) * WORDS]
                cnt = qcnt[o, r]
                head = cnt % 4
                if cnt == 0:
                    d[:] = 0
                    continue
                if head == 1:
                    a = _plane(src, qidx[o, r, 0], sb)
                    for w in range(WORDS):
                        d[w] = a[w]
                elif head == 2:
                    a = _plane(src, qidx[o, r, 0], sb)
                    b2 = _plane(src, qidx[o, r, 1], sb)
                    for w in range(WORDS):
                        d[w] = a[w] ^ b2[w]
                elif head == 3:
                    a = _plane(src, qidx[o, r, 0], sb)
                    b2 = _plane(src, qidx[o, r, 1], sb)
                    c = _plane(src, qidx[o, r, 2], sb)
                    for w in range(WORDS):
                        d[w] = a[w] ^ b2[w] ^ c[w]
                else:
                    d[:] = 0
                for t in range(head, cnt, 4):
                    a = _plane(src, qidx[o, r, t], sb)
                    b2 = _plane(src, qidx[o, r, t + 1], sb)
                    c = _plane(src, qidx[o, r, t + 2], sb)
                    e = _plane(src, qidx[o, r, t + 3], sb)
                    for w in range(WORDS):
                        d[w] ^= a[w] ^ b2[w] ^ c[w] ^ e[w]
