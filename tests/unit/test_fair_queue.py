from __future__ import annotations

import threading

import pytest

from llmos.kernel.fair_queue import Empty, FairQueue


def test_tenants_are_served_in_turn_and_each_keeps_its_order() -> None:
    q: FairQueue[str] = FairQueue()
    for i in range(5):
        q.put("flood", f"f{i}")
    q.put("quiet", "q0")
    q.put("quiet", "q1")
    got = [q.get_nowait() for _ in range(7)]
    assert got[:4] == ["f0", "q0", "f1", "q1"]
    assert got[4:] == ["f2", "f3", "f4"]
    assert q.empty()


def test_get_times_out_when_empty() -> None:
    q: FairQueue[int] = FairQueue()
    with pytest.raises(Empty):
        q.get(timeout=0.01)
    with pytest.raises(Empty):
        q.get_nowait()


def test_blocking_get_wakes_on_put() -> None:
    q: FairQueue[int] = FairQueue()
    out: list[int] = []
    t = threading.Thread(target=lambda: out.append(q.get(timeout=5)))
    t.start()
    q.put("a", 42)
    t.join(timeout=5)
    assert out == [42]
    assert len(q) == 0


def test_skipped_tenants_keep_their_items_and_put_back_restores_the_turn() -> None:
    q: FairQueue[str] = FairQueue()
    for i in range(3):
        q.put("flood", f"f{i}")
    q.put("quiet", "q0")
    assert q.get_nowait(skip={"flood"}) == "q0"
    with pytest.raises(Empty):
        q.get_nowait(skip={"flood"})
    assert q.waiting() == {"flood": 3}
    first = q.get_nowait()
    q.put("quiet", "q1")
    q.put_back("flood", first)  # not admitted after all: first in line again, and its turn kept
    assert [q.get_nowait() for _ in range(len(q))] == ["f0", "q1", "f1", "f2"]
