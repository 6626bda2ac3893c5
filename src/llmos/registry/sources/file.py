"""``file:<path>``: a local Hugging Face directory, a safetensors file, or a GGUF file."""

from __future__ import annotations

from pathlib import Path

from llmos.errors import SourceError
from llmos.registry.sources.base import ModelSource, Progress, register_source


@register_source
class FileSource(ModelSource):
    scheme = "file"

    def fetch(self, spec: str, staging: Path, cache: Path, progress: Progress) -> Path:
        path = Path(spec.removeprefix("//")).expanduser()
        if not path.exists():
            raise SourceError(f"no such file or directory: {path}", param="source")
        progress.stage(f"reading {path.name}")
        return path.resolve()
