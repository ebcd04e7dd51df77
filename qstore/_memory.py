"""Process-wide allocator tuning for the data path (glibc only; a no-op elsewhere).

glibc serves every allocation above 128 KiB with a fresh ``mmap`` and returns
it on free, so each 4 MiB chunk, frame or envelope costs a page fault per
4 KiB page on first touch: on a virtual machine that made a copy of 4 MiB
six times slower than the copy itself. Raising the mmap threshold keeps
such buffers on the heap, where freed ones are reused warm; the trim
threshold keeps glibc from handing the heap top back after every chunk.
Peak memory stays what the pipeline holds at once (it is bounded there).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
HEAP_KEPT_BYTES = 64 << 20
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 64 << 20


def _mallopt(param: int, value: int) -> bool:
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(param, value))


def tune_allocator() -> bool:
    """Keep large buffers on the heap; True when glibc took the settings."""
    return _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and _mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def keep_freed_heap(nbytes: int = HEAP_KEPT_BYTES) -> bool:
    """Have glibc keep up to ``nbytes`` of freed heap (``M_TOP_PAD``) in this process; False elsewhere.

    Keys come and go in bursts of megabytes (16 keys of 1 MiB per request):
    a KME makes them and frees them once sent, an SAE decodes them and
    frees them once copied into its key streams. By default glibc gives such
    a block back to the kernel as soon as a few MiB are free at the top of
    the heap, and the next burst faults every page in again, at about
    1.3 GB/s on our VMs: slower than making, encoding and encrypting the keys
    together. The memory kept is bounded and reused by the next burst.
    Process-wide: :class:`~qkd_sim.sae.SAEClient` and the KME's :func:`~qkd_sim.kme.start`
    and :func:`~qkd_sim.kme.serve` call it.
    """
    return _mallopt(M_TOP_PAD, nbytes)
