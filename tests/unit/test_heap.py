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


_LARGE_BLOCK_PROBE = """
import torch
from llmos.engine import heap
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
if {fixed}:
    assert heap.map_large_blocks()
big = torch.empty(16 << 20, dtype=torch.uint8).fill_(1)
del big  # glibc's default raises its mmap threshold to this block's size
keep = torch.empty(1 << 10, dtype=torch.uint8).fill_(1)
before = rss()
blocks = [torch.empty(8 << 20, dtype=torch.uint8).fill_(1) for _ in range(4)]
keep2 = torch.empty(1 << 20, dtype=torch.uint8).fill_(1)  # after them: the heap cannot shrink past it
del blocks
print((rss() - before) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or heap._libc() is None, reason="glibc only")
def test_large_blocks_go_back_to_the_system_when_freed() -> None:
    import subprocess

    def retained(fixed: bool) -> int:
        code = _LARGE_BLOCK_PROBE.format(fixed=fixed)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return int(done.stdout.strip())

    assert retained(False) >= 24  # glibc's default: 32 MB of freed blocks stay resident
    assert retained(True) <= 2  # mapped apart, each went back as it was freed
