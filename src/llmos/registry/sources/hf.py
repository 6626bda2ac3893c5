"""``hf:<org>/<name>[@revision]``: a repository on the Hugging Face hub (or its local cache).

Pickle-format weights are never requested; with ``HF_HUB_OFFLINE=1`` the local cache answers.
"""

from __future__ import annotations

import re
from pathlib import Path

from llmos.errors import SourceError
from llmos.registry.sources.base import ModelSource, Progress, register_source

_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.gguf", "*.txt", "*.model", "*.jinja", "*.md", "*/config.json"]


@register_source
class HuggingFaceSource(ModelSource):
    scheme = "hf"

    def fetch(self, spec: str, staging: Path, cache: Path, progress: Progress) -> Path:
        repo_id, _, revision = spec.partition("@")
        if not _REPO.fullmatch(repo_id) or ".." in repo_id:
            raise SourceError(f"invalid Hugging Face repository id {repo_id!r}", param="source")
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        progress.stage(f"downloading {repo_id} from the Hugging Face hub")
        try:
            path = snapshot_download(repo_id, revision=revision or None, allow_patterns=ALLOW_PATTERNS)
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
            raise SourceError(f"cannot fetch hf:{spec}: {exc}", param="source") from exc
        return Path(path)
