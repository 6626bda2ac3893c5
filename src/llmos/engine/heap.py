"""Giving freed memory back to the operating system.

glibc keeps what a process frees in its heaps (one arena per thread that allocated), so after a
burst of large temporary tensors (the copies a rebuild of the lean step's matrices makes) the
process's resident memory stays as high as the burst, most of it free memory that
``malloc_trim`` gives back (docs/performance.md, design measurements, has what eight adapter loads
left behind). Within a burst of decode steps the same happens step after step: once a large
block has been freed, glibc raises its mmap threshold (up to 32 MB) and serves later blocks of
that size from its heaps, where what the batch frees stays resident; a burst's batches,
joining and leaving rows, reallocate their key/value tensors at ever new sizes and the freed
ones pile up. ``release_beyond`` bounds that pile: an engine calls it after each step, and it
trims once the memory resident beyond the heaps' live blocks has grown by more than a slack
since the last trim (docs/performance.md, Decode-batch memory). Elsewhere (not glibc) this does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading
from collections.abc import Callable

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (2.33 and later): every arena's counts, in bytes."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


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


@functools.cache
def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    libc = _libc()
    function = getattr(libc, "mallinfo2", None) if libc is not None else None
    if function is not None:
        function.restype = _MallInfo2
        function.argtypes = []
    return function


def live_bytes() -> int | None:
    """What malloc has handed out and not had back, in its heaps and its own mappings; None
    where the C library does not say (not glibc 2.33 or later)."""
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return None
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


def resident_bytes() -> int | None:
    """The process's resident memory (None where /proc is not there)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


class _Trimmed:
    """The process's resident memory beyond malloc's live blocks just after the last trim:
    libraries, Python's own arenas, file pages, and what the heaps could not give back; and
    whether the next check takes its measure afresh (the step after a trim refills what the
    trim gave back)."""

    lock = threading.Lock()
    beyond_live: int | None = None
    refilling: bool = False


def _beyond_live() -> int | None:
    live, resident = live_bytes(), resident_bytes()
    return None if live is None or resident is None else resident - live


def trim() -> None:
    """Return the heaps' free memory to the system (cheap: a few milliseconds)."""
    release = _malloc_trim()
    if release is None:
        return
    with _Trimmed.lock:
        release(0)
        _Trimmed.beyond_live = _beyond_live()
        _Trimmed.refilling = True


def release_beyond(slack_bytes: int) -> bool:
    """Trim when the memory resident beyond malloc's live blocks has grown by more than
    ``slack_bytes`` since the last trim (freed blocks that the heaps keep); True if it trimmed.

    The check after a trim (here or when an engine went idle) takes the pile it finds as the new
    floor: a step's temporaries, freed
    at its end, are the working set of the next step as well, so giving them back would only have
    every step fault them in again (a 64-row batch served 14-26% fewer tokens a second that
    way, docs/performance.md). What is bounded is growth beyond the batches' working set.

    So the process's resident memory stays within its live blocks, what was resident beside them
    at the floor (after the last trim and its refill, or since, the least of it; before any trim,
    at the first call), and ``slack_bytes``."""
    beyond = _beyond_live()
    if beyond is None or _malloc_trim() is None:
        return False
    with _Trimmed.lock:
        floor = _Trimmed.beyond_live
        if floor is None or _Trimmed.refilling or beyond - floor <= slack_bytes:
            # Less beside the live blocks than at the floor (memory unmapped, a buffer malloc handed
            # out and nobody wrote yet): the slack counts from here.
            _Trimmed.beyond_live = beyond if floor is None or _Trimmed.refilling else min(floor, beyond)
            _Trimmed.refilling = False
            return False
    trim()
    return True
