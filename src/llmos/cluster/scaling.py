"""Each model's replicas scaled between ``ray_min_replicas`` and ``ray_max_replicas`` on queue depth.

Ray Serve's rule: a model wants the requests in flight over all its replicas divided by
``ray_target_queue_depth``, rounded up. More wanted than it has (counting those starting): one
more is placed at once, off the request path. Fewer wanted for ``ray_scale_down_delay_s`` on end:
an idle replica is stopped, one at a time, so a short lull does not throw away a loaded model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from llmos.cluster.routing import replicas_wanted
from llmos.config import Settings

if TYPE_CHECKING:
    from llmos.cluster.pool import ReplicaPool

log = logging.getLogger(__name__)

TICK_S = 1.0
"""How often surplus replicas are looked for."""


class Autoscaler:
    def __init__(self, pool: ReplicaPool, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.minimum = settings.ray_min_replicas
        self.maximum = settings.ray_max_replicas or settings.ray_min_replicas
        self.target = settings.ray_target_queue_depth
        self.delay = settings.ray_scale_down_delay_s
        self.clock = clock
        self._surplus_since: dict[str, float] = {}
        self._growing: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.maximum > self.minimum

    def wanted(self, model_key: str) -> int:
        depths = [r.queue_depth for r in self.pool.live(model_key)]
        return replicas_wanted(depths, target=self.target, minimum=self.minimum, maximum=self.maximum)

    def observe(self, model_key: str) -> None:
        """A request was just routed to one of ``model_key``'s replicas: grow the model if its load asks."""
        if not self.enabled:
            return
        if self._loop is None:
            self._loop = asyncio.get_running_loop().create_task(self._run())
        if model_key not in self._growing and self.wanted(model_key) > len(self.pool.live(model_key)):
            self._growing.add(model_key)
            task = asyncio.get_running_loop().create_task(self._grow(model_key))
            self._tasks.add(task)  # held until done: the loop keeps only weak references
            task.add_done_callback(self._tasks.discard)

    async def _grow(self, model_key: str) -> None:
        try:
            await self.pool.ensure(model_key, self.wanted(model_key))
        except Exception as exc:  # no node with room, a failed load: requests go on to the replicas there are
            log.warning("scaling up %s failed: %s", model_key, exc)
        finally:
            self._growing.discard(model_key)

    def tick(self) -> None:
        """Stop one idle replica of each model that has wanted fewer for ``delay`` seconds."""
        now = self.clock()
        for model_key in {r.model_key for r in self.pool.replicas}:
            live = self.pool.live(model_key)
            if self.wanted(model_key) >= len(live):
                self._surplus_since.pop(model_key, None)
                continue
            since = self._surplus_since.setdefault(model_key, now)
            idle = [r for r in live if r.state == "ready" and r.queue_depth == 0]
            if now - since >= self.delay and idle:
                self.pool.stop(idle[-1])
                self._surplus_since[model_key] = now  # the next one waits a full delay again

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self.tick()

    def close(self) -> None:
        for task in [*self._tasks, *([self._loop] if self._loop else [])]:
            task.cancel()
