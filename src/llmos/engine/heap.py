"""Giving freed memory back to the operating system.

glibc keeps what a process frees in its heaps (one arena per thread that allocated), so after a
burst of large temporary tensors (the copies a rebuild of the lean step's matrices makes) the
process's resident memory stays as high as the burst, most of it free memory that
``malloc_trim`` gives back (docs/performance.md, design measurements, has what eight adapter loads
left behind). Elsewhere (not glibc) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
MMAP_THRESHOLD_BYTES = 128 << 10


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def _malloc_trim() -> Callable[[int], int] | None:
    libc = _libc()
    return getattr(libc, "malloc_trim", None) if libc is not None else None


def map_large_blocks() -> bool:
    """Serve every block of ``MMAP_THRESHOLD_BYTES`` or more from a mapping of its own, returned to
    the system the moment it is freed. glibc starts there too, but raises the threshold (up to
    32 MB) each time such a block is freed, after which a decode batch's tensors come from its
    heaps, where freed memory stays resident: a serving process then grew by gigabytes over a few
    bursts of requests and kept it (docs/performance.md, memory). Fixing the threshold keeps the
    process's memory what its batches use. False where this is not glibc."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    return bool(mallopt is not None and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1)


def trim() -> None:
    """Return the heaps' free memory to the system (cheap: a few milliseconds)."""
    release = _malloc_trim()
    if release is not None:
        release(0)
