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
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 64 << 20


def tune_allocator() -> bool:
    """Keep large buffers on the heap; True when glibc took the settings."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
