from __future__ import annotations

import threading
import time

import pytest

from llmos.errors import ServiceUnavailableError
from llmos.kernel import ModelResidency

MB = 1 << 20


def make(budget_mb: int, sizes: dict[str, int]) -> tuple[ModelResidency[str], list[str], list[str]]:
    loaded: list[str] = []
    unloaded: list[str] = []

    def load(key: str) -> str:
        loaded.append(key)
        return f"model:{key}"

    return ModelResidency(budget_mb * MB, load, unloaded.append, lambda k: sizes[k] * MB), loaded, unloaded


def test_loads_once_and_reuses() -> None:
    res, loaded, _ = make(100, {"a": 10})
    with res.use("a") as a1, res.use("a") as a2:
        assert a1 == a2 == "model:a"
    assert loaded == ["a"]


def test_evicts_least_recently_used_idle_model() -> None:
    res, _, unloaded = make(100, {"a": 40, "b": 40, "c": 40})
    with res.use("a"):
        pass
    with res.use("b"):
        pass
    with res.use("a"):
        pass  # a is now more recent than b
    with res.use("c"):
        pass
    assert unloaded == ["model:b"]
    assert sorted(res.resident()) == ["a", "c"]


def test_busy_models_are_never_evicted() -> None:
    res, _, unloaded = make(100, {"a": 60, "b": 60})
    with res.use("a"), res.use("b"):
        assert unloaded == []  # over budget, but both are in use
    assert res.used_bytes == 120 * MB


def test_model_larger_than_budget_is_refused() -> None:
    res, loaded, _ = make(10, {"big": 20})
    with pytest.raises(ServiceUnavailableError):
        res.acquire("big")
    assert loaded == []


def test_concurrent_first_use_loads_once() -> None:
    calls = []

    def slow_load(key: str) -> str:
        calls.append(key)
        time.sleep(0.05)
        return key

    res: ModelResidency[str] = ModelResidency(100 * MB, slow_load, lambda v: None, lambda k: MB)
    threads = [threading.Thread(target=lambda: res.release("a") if res.acquire("a") else None) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["a"]


def test_evict_only_when_idle() -> None:
    res, _, unloaded = make(100, {"a": 10})
    res.acquire("a")
    assert not res.evict("a")
    res.release("a")
    assert res.evict("a")
    assert unloaded == ["model:a"]


def test_discarded_value_is_replaced_and_its_late_release_leaves_the_new_one_pinned() -> None:
    """A crashed runner is discarded while requests still hold it; the next acquire loads a fresh
    one, and the old holders' releases must not unpin the fresh one."""
    unloaded: list[object] = []
    res: ModelResidency[object] = ModelResidency(100 * MB, lambda key: object(), unloaded.append, lambda k: 10 * MB)
    old = res.acquire("a")
    assert res.discard("a", old)
    assert not res.discard("a", old)  # already gone
    new = res.acquire("a")
    assert new is not old and res.peek("a") is new
    res.release("a", old)  # the crashed runner's holder lets go
    assert not res.evict("a")  # the fresh one is still pinned by its own user
    res.release("a", new)
    assert res.evict("a") and unloaded == [new]
