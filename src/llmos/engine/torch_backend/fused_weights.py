"""The lean step's weight matrices with every resident LoRA adapter's ``A`` rows appended.

On a CPU a small bf16 product costs its call, not its arithmetic, so an adapted projection's
``x @ A.T`` is far cheaper as extra output columns of the base product it shares an input with
than as a product of its own: appended to the base matrices, the ``A`` rows cost a fraction of
what the four ``A`` products a layer cost apart (docs/performance.md, design measurements).
A ``Generation`` holds such matrices for one set of resident adapters (one ``BankView``'s
columns): group ``g`` of layer ``i`` multiplies by ``[W_g; A_g]``, its first ``out`` columns the
base output (bit for bit what the base matrix alone gives) and the rest every resident adapter's
``A`` output, which ``LoraGroups`` masks per row before the ``B`` products.

Packing a generation takes a few hundred milliseconds (every base matrix is copied and reordered
for oneDNN), so it is built on a helper thread when the adapters change, and until it is ready
the step computes the ``A`` products apart: loading an adapter never stalls the batch. The
generation replaces the plain packed copies, so it costs only the ``A`` rows' memory.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from llmos.engine.heap import trim
from llmos.engine.threads import enter_helper_thread
from llmos.engine.torch_backend.lora_bank import BankView
from llmos.engine.torch_backend.lora_groups import Layout
from llmos.engine.torch_backend.packed import Matrix

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """The matrices of every layer group for the adapters of one bank view."""

    spans: Mapping[str, tuple[int, int]]
    serials: Mapping[str, int]
    width: int
    modules: frozenset[str]
    layers: list[dict[str, Matrix]]

    def covers(self, view: BankView) -> bool:
        """Whether this generation's ``A`` rows are those of every adapter in ``view``: the same
        columns and the same load of each (a view that only dropped adapters is still covered:
        a dropped adapter's columns are never selected)."""
        if view.width != self.width or frozenset(view.weights) != self.modules:
            return False
        return all(
            self.spans.get(a) == span and self.serials.get(a) == view.serials.get(a) for a, span in view.spans.items()
        )

    @property
    def nbytes(self) -> int:
        """Memory held by the matrices' copies (packed base and ``A`` rows)."""
        return sum(m.nbytes for layer in self.layers for m in layer.values())

    @property
    def adapter_bytes(self) -> int:
        """The part of ``nbytes`` that is adapters' ``A`` rows."""
        return sum(m.nbytes * m.extra_rows // (m.out + m.extra_rows) for layer in self.layers for m in layer.values())


def build_generation(
    base: list[dict[str, torch.Tensor]], layout: Layout, view: BankView, biases: list[dict[str, torch.Tensor]]
) -> Generation:
    """The matrices of ``base`` (per layer, group -> fused base weight; ``biases``: the groups that
    have one) with ``view``'s ``A`` rows: per group, the adapted modules' ``A`` stacked in layout
    order (as ``LoraGroups`` reads them)."""
    layers = []
    for weights, groups, bias in zip(base, layout, biases, strict=True):
        layers.append({g: Matrix(w, _a_rows(view, groups[g]), bias.get(g)) for g, w in weights.items()})
    return Generation(dict(view.spans), dict(view.serials), view.width, frozenset(view.weights), layers)


def _a_rows(view: BankView, names: list[tuple[str, int]]) -> torch.Tensor | None:
    parts = [view.weights[name][0] for name, _ in names if name in view.weights]
    if not parts:
        return None
    return torch.cat(parts) if len(parts) > 1 else parts[0]


class GenerationBuilder:
    """Builds generations on a helper thread, for the latest view asked for, and publishes each."""

    def __init__(self, build: Callable[[BankView], Generation], publish: Callable[[Generation], None]) -> None:
        self._build = build
        self._publish = publish
        self._cv = threading.Condition()
        self._wanted: BankView | None = None
        self._failed: tuple[int, tuple[tuple[str, int], ...]] | None = None  # a failed view's _identity
        self._thread: threading.Thread | None = None
        self._closed = False

    def want(self, view: BankView) -> None:
        """Ask for ``view``'s generation (ignored while it is being built, after one for the same
        adapters failed, or once closed)."""
        with self._cv:
            if self._closed or view is self._wanted or _identity(view) == self._failed:
                return
            self._wanted = view
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lora-fuse", daemon=True)
                self._thread.start()
            self._cv.notify()

    @property
    def busy(self) -> bool:
        """Whether a generation is being built (or waits to be)."""
        with self._cv:
            return self._wanted is not None

    def wait(self, timeout: float = 60.0) -> bool:
        """Block until nothing is wanted (tests, benchmarks)."""
        with self._cv:
            return self._cv.wait_for(lambda: self._wanted is None, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the helper thread (after the build under way, if any): it holds the model."""
        with self._cv:
            self._closed = True
            self._wanted = None
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        enter_helper_thread()  # one core: the engine thread keeps the other
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._wanted is not None or self._closed)
                if self._closed:
                    return
                view = self._wanted
            assert view is not None
            try:
                generation: Generation | None = self._build(view)
            except Exception as exc:  # the step keeps computing A products apart
                log.warning("could not fuse the LoRA adapters into the base matrices: %s", exc)
                generation = None
            with self._cv:
                if generation is None:
                    self._failed = _identity(view)
                elif not self._closed:
                    self._publish(generation)
                if self._wanted is view:
                    self._wanted = None
                self._cv.notify_all()
            del view, generation  # the replaced generation goes with the engine's next pass
            trim()  # the build's temporary copies


def _identity(view: BankView) -> tuple[int, tuple[tuple[str, int], ...]]:
    """What a generation depends on in a view: its width and which loads wrote its columns."""
    return view.width, tuple(sorted(view.serials.items()))
