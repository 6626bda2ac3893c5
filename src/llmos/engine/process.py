"""Process-wide setup for serving, done once by ``llmos serve`` from its settings.

Building an engine changes nothing about its process; these switches are the server's choice
(a library user or a test that builds an engine keeps its interpreter as it was).
"""

from __future__ import annotations

import sys

from llmos.config import Settings
from llmos.engine import threads
from llmos.engine.torch_backend import native

GIL_SWITCH_INTERVAL_S = 0.0002
"""The engine thread re-takes the GIL after each of the hundreds of torch operators of a forward
pass; with Python's default 5 ms switch interval it waits behind the event loop's thread (a GIL
convoy). docs/performance.md, design measurements, has the measurement."""


def configure_process(settings: Settings) -> None:
    threads.configure(settings.threads)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    native.set_cache_dir(settings.kernel_dir or None)
