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


def trim() -> None:
    """Return the heaps' free memory to the system (cheap: a few milliseconds)."""
    release = _malloc_trim()
    if release is not None:
        release(0)
