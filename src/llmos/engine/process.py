"""Process-wide setup for serving, done once by ``llmos serve`` from its settings.

Building an engine changes nothing about its process; these switches are the server's choice
(a library user or a test that builds an engine keeps its interpreter as it was).
"""

from __future__ import annotations

import os
import sys

from llmos.config import Settings
from llmos.engine import threads
from llmos.engine.torch_backend import native

GIL_SWITCH_INTERVAL_S = 0.0002
"""The engine thread re-takes the GIL after each of the hundreds of torch operators of a forward
pass; with Python's default 5 ms switch interval it waits behind the event loop's thread (a GIL
convoy). docs/performance.md, design measurements, has the measurement."""

ONEDNN_CACHE_PRIMITIVES = 32
"""oneDNN compiles a primitive for every product shape it meets and keeps it in two caches of
1,024 entries each (its own, and torch's ideep beside it). A decode step's attention products are
shaped by the cache's width, one position wider every step, so a serving process adds two
primitives a step (about 1.3 MB for SmolLM2) and would hold up to about 1.3 GB of them once the
caches fill. A step meets a few dozen shapes at most, so this many keeps every shape a step reuses
(docs/performance.md, Decode-batch memory). Both are read once, at the first primitive: before
any model is loaded. An operator's own values win."""
ONEDNN_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def cap_onednn_caches() -> None:
    """Bound oneDNN's primitive caches (``ONEDNN_CACHE_PRIMITIVES``), unless the operator set them."""
    for cache in ONEDNN_CACHES:
        os.environ.setdefault(cache, str(ONEDNN_CACHE_PRIMITIVES))


def configure_process(settings: Settings) -> None:
    cap_onednn_caches()
    threads.configure(settings.threads)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    native.set_cache_dir(settings.kernel_dir or None)
