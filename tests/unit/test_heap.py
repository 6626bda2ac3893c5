"""Freed memory goes back to the system after a burst of temporaries (glibc only)."""

from __future__ import annotations

import sys

import pytest
import torch

from llmos.engine import heap


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or heap._malloc_trim() is None, reason="glibc only")
def test_trim_gives_freed_heap_memory_back() -> None:
    # 256 MB in blocks small enough for the heap (not mmap), one kept after them: freeing the rest
    # leaves the heap as large as before, which glibc keeps until it is trimmed.
    blocks = [torch.empty(64 << 10, dtype=torch.uint8).fill_(1) for _ in range(4096)]
    keep = torch.empty(64 << 10, dtype=torch.uint8).fill_(1)
    del blocks
    before = _rss_mb()
    heap.trim()
    assert before - _rss_mb() > 128  # most of the 256 MB given back
    assert keep.sum() > 0


@pytest.mark.skipif(not sys.platform.startswith("linux") or heap.live_bytes() is None, reason="glibc 2.33+ only")
def test_release_beyond_gives_freed_memory_back_only_past_its_slack() -> None:
    heap.trim()  # the slack counts from here
    # 96 MB in heap-sized blocks, one kept after them: once freed, resident and not live.
    blocks = [torch.empty(64 << 10, dtype=torch.uint8).fill_(1) for _ in range(1536)]
    keep = torch.empty(64 << 10, dtype=torch.uint8).fill_(1)
    assert not heap.release_beyond(32 << 20)  # live blocks are not a pile of freed ones
    del blocks
    assert not heap.release_beyond(256 << 20)  # 96 MB freed: within a 256 MB slack
    before = _rss_mb()
    assert heap.release_beyond(32 << 20)  # past a 32 MB one: given back
    assert before - _rss_mb() > 64
    # The next step's temporaries refill what the trim gave back: its working set, not trimmed again.
    blocks = [torch.empty(64 << 10, dtype=torch.uint8).fill_(1) for _ in range(1536)]
    del blocks
    assert not heap.release_beyond(32 << 20)
    assert not heap.release_beyond(32 << 20)  # and counted from there
    # Twice as much, freed: past the working set by more than the slack, given back.
    blocks = [torch.empty(64 << 10, dtype=torch.uint8).fill_(1) for _ in range(3072)]
    keep_too = torch.empty(64 << 10, dtype=torch.uint8).fill_(1)
    del blocks
    assert heap.release_beyond(32 << 20)
    assert keep.sum() > 0 and keep_too.sum() > 0
