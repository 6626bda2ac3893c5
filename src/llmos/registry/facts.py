"""Reads what a model directory is: architecture, task, size, context length."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmos.errors import ArtifactError
from llmos.registry.formats import read_json

TASKS = ("chat", "completion", "embedding", "sequence-classification", "token-classification")


@dataclass(frozen=True)
class ModelFacts:
    family: str | None
    architecture: str | None
    task: str
    context_length: int | None


def inspect_model_dir(root: Path) -> ModelFacts:
    config_path = root / "config.json"
    if not config_path.is_file():
        raise ArtifactError("model has no config.json; cannot tell its architecture", code="unsupported_artifact")
    config = read_json(config_path)
    architectures = config.get("architectures") or []
    architecture = architectures[0] if architectures and isinstance(architectures[0], str) else None
    family = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    return ModelFacts(
        family=family,
        architecture=architecture,
        task=_task(root, architecture),
        context_length=_context_length(root, config),
    )


def _task(root: Path, architecture: str | None) -> str:
    arch = architecture or ""
    if arch.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")):
        return "chat" if _has_chat_template(root) else "completion"
    if arch.endswith("ForSequenceClassification"):
        return "sequence-classification"
    if arch.endswith("ForTokenClassification"):
        return "token-classification"
    if (root / "modules.json").is_file() or arch.endswith("Model"):
        return "embedding"
    raise ArtifactError(f"unsupported architecture {architecture!r}", code="unsupported_artifact")


def _has_chat_template(root: Path) -> bool:
    if (root / "chat_template.jinja").is_file() or (root / "chat_template.json").is_file():
        return True
    tok_config = root / "tokenizer_config.json"
    return tok_config.is_file() and bool(read_json(tok_config).get("chat_template"))


def _context_length(root: Path, config: dict[str, object]) -> int | None:
    st_config = root / "sentence_bert_config.json"
    if st_config.is_file():
        value = read_json(st_config).get("max_seq_length")
        if isinstance(value, int):
            return value
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = config.get(key)
        if isinstance(value, int):
            return value
    return None
