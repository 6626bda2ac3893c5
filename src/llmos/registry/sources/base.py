"""The model-source protocol and its scheme registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

from llmos.errors import SourceError


class Progress:
    """Receives progress of a long operation; the CLI draws it as a bar. The default does nothing."""

    def stage(self, description: str, total: int | None = None) -> None:
        """A new stage begins; ``total`` is its size in bytes when known."""

    def advance(self, amount: int) -> None:
        """``amount`` more bytes of the current stage are done."""


NullProgress = Progress


class ModelSource(ABC):
    """Fetches the files of a model named by ``<scheme>:<spec>`` into a local path."""

    scheme: str

    @abstractmethod
    def fetch(self, spec: str, staging: Path, cache: Path, progress: Progress) -> Path:
        """Return a local file or directory holding the model.

        ``staging`` is a fresh directory the caller removes afterwards; ``cache`` persists
        between pulls (downloaded archives live there).
        """


_SOURCES: dict[str, Callable[[], ModelSource]] = {}


def register_source(cls: type[ModelSource]) -> type[ModelSource]:
    _SOURCES[cls.scheme] = cls
    return cls


def get_source(uri: str) -> tuple[ModelSource, str]:
    scheme, sep, spec = uri.partition(":")
    if not sep or not spec:
        raise SourceError(
            f"model source {uri!r} must look like <scheme>:<spec>; schemes: {sorted(_SOURCES)}", param="source"
        )
    factory = _SOURCES.get(scheme)
    if factory is None:
        raise SourceError(f"unknown model source scheme {scheme!r}; known: {sorted(_SOURCES)}", param="source")
    return factory(), spec
