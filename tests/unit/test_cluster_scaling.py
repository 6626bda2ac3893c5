"""Replicas scaled on queue depth (Ray cluster mode), on a pool faked without Ray and a fake clock."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from llmos.cluster.routing import replicas_wanted
from llmos.cluster.scaling import Autoscaler
from llmos.config import Settings


@pytest.mark.parametrize(
    ("depths", "wanted"),
    [([], 1), ([0, 0], 1), ([8], 1), ([9], 2), ([8, 8, 1], 3), ([40, 40], 4)],
)
def test_replicas_wanted_is_in_flight_over_target_within_bounds(depths: list[int], wanted: int) -> None:
    assert replicas_wanted(depths, target=8, minimum=1, maximum=4) == wanted


@dataclass(eq=False)
class _Replica:
    model_key: str
    queue_depth: int = 0
    state: str = "ready"


@dataclass
class _Pool:
    replicas: list[_Replica] = field(default_factory=list)
    stopped: list[_Replica] = field(default_factory=list)
    ensured: list[tuple[str, int | None]] = field(default_factory=list)

    def live(self, model_key: str) -> list[_Replica]:
        return [r for r in self.replicas if r.model_key == model_key]

    def stop(self, replica: _Replica) -> None:
        self.replicas.remove(replica)
        self.stopped.append(replica)

    async def ensure(self, model_key: str, wanted: int | None = None) -> None:
        self.ensured.append((model_key, wanted))
        while len(self.live(model_key)) < (wanted or 1):
            self.replicas.append(_Replica(model_key, state="starting"))


class _Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def _scaler(pool: _Pool, clock: _Clock, **settings: object) -> Autoscaler:
    values = {"ray_min_replicas": 1, "ray_max_replicas": 3, "ray_target_queue_depth": 2, "ray_scale_down_delay_s": 60}
    return Autoscaler(pool, Settings(**{**values, **settings}), clock=clock)  # type: ignore[arg-type]


def test_a_model_grows_one_replica_when_its_queue_asks_and_not_past_the_maximum() -> None:
    pool = _Pool([_Replica("m", queue_depth=3)])
    scaler = _scaler(pool, _Clock())

    async def run() -> None:
        scaler.observe("m")  # 3 in flight at 2 a replica: 2 wanted
        await asyncio.sleep(0.05)
        pool.replicas[0].queue_depth = 20  # far more: still at most 3
        scaler.observe("m")
        await asyncio.sleep(0.05)
        scaler.close()

    asyncio.run(run())
    assert pool.ensured == [("m", 2), ("m", 3)]
    assert len(pool.live("m")) == 3


def test_without_a_maximum_above_the_minimum_nothing_scales() -> None:
    pool = _Pool([_Replica("m", queue_depth=50)])
    scaler = _scaler(pool, _Clock(), ray_max_replicas=None)
    assert not scaler.enabled
    scaler.observe("m")  # no running loop needed: it returns at once
    assert pool.ensured == []


def test_an_idle_surplus_replica_is_stopped_only_after_the_delay_one_at_a_time() -> None:
    pool = _Pool([_Replica("m", queue_depth=1), _Replica("m"), _Replica("m")])
    clock = _Clock()
    scaler = _scaler(pool, clock)
    scaler.tick()
    assert pool.stopped == []
    clock.now = 59.0
    scaler.tick()
    assert pool.stopped == []
    clock.now = 60.0
    scaler.tick()
    assert len(pool.stopped) == 1 and pool.stopped[0].queue_depth == 0
    clock.now = 61.0
    scaler.tick()
    assert len(pool.stopped) == 1  # the next waits a whole delay again
    clock.now = 120.0
    scaler.tick()
    assert len(pool.stopped) == 2
    assert [r.queue_depth for r in pool.replicas] == [1]  # the minimum, and never a busy one


def test_a_busy_spell_resets_the_scale_down_delay() -> None:
    pool = _Pool([_Replica("m"), _Replica("m")])
    clock = _Clock()
    scaler = _scaler(pool, clock)
    scaler.tick()
    clock.now = 50.0
    pool.replicas[0].queue_depth = 4  # wants 2 again
    scaler.tick()
    pool.replicas[0].queue_depth = 0
    clock.now = 70.0
    scaler.tick()  # surplus again since 70, not since 0
    assert pool.stopped == []
    clock.now = 130.0
    scaler.tick()
    assert len(pool.stopped) == 1


def test_a_maximum_below_the_minimum_is_refused() -> None:
    with pytest.raises(ValueError, match="ray_max_replicas"):
        Settings(ray_min_replicas=3, ray_max_replicas=2)
