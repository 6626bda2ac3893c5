"""What an export starts from: a registered model as one Hugging Face directory (a LoRA adapter
merged into its base with PEFT's ``merge_and_unload``), its task, and what the torch model
answers on the probes (``verify``), computed before anything is converted."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmos.errors import InvalidRequestError
from llmos.export.verify import Reference, causal_reference, encoder_reference
from llmos.registry.adapters import ADAPTER_FORMAT, ADAPTER_FORMATS, is_adapter_dir
from llmos.registry.records import ModelRecord
from llmos.registry.service import ModelRegistry

CAUSAL_TASKS = frozenset({"chat", "completion"})
ENCODER_CLASSES = {
    "embedding": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
}
NOT_EXPORTED = (".gguf",)  # a GGUF-pulled model's original file: not part of its Hugging Face directory
_WRITTEN_BY_SAVE = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json"}


@dataclass(frozen=True)
class Source:
    """A model to export, resolved before anything runs: the directory its config and tokenizer
    come from (an adapter's base) and, for a LoRA adapter, the adapter's own directory."""

    record: ModelRecord
    task: str
    config_dir: Path
    adapter_dir: Path | None


@dataclass(frozen=True)
class Prepared:
    """The Hugging Face directory to export and the torch model's answers to compare against."""

    source: Source
    model_dir: Path
    reference: Reference

    def files(self) -> list[Path]:
        """The directory's files, without what is not part of a Hugging Face model."""
        return sorted(p for p in self.model_dir.rglob("*") if p.is_file() and p.suffix not in NOT_EXPORTED)


def resolve_source(registry: ModelRegistry, record: ModelRecord) -> Source:
    """400 ``unsupported_export`` for models no format can start from (prompt-learning adapters:
    their virtual tokens are no weights to merge)."""
    if record.format in ADAPTER_FORMATS:
        if record.format != ADAPTER_FORMAT or record.parent_id is None:
            raise InvalidRequestError(
                f"{record.name} is a {record.format} adapter: its virtual tokens cannot be merged into weights, "
                "so it cannot be exported; LoRA adapters can",
                param="model",
                code="unsupported_export",
            )
        base = registry.get(record.parent_id)
        return Source(record, base.task, registry.model_dir(base), registry.model_dir(record))
    model_dir = registry.model_dir(record)
    if is_adapter_dir(model_dir):
        raise InvalidRequestError(
            f"{record.name} carries prompt-learning virtual tokens, which no export format holds",
            param="model",
            code="unsupported_export",
        )
    return Source(record, record.task, model_dir, None)


def prepare(source: Source, staging: Path) -> Prepared:
    """Load the torch model once: take its reference answers, then (an adapter) merge and save."""
    model, tokenizer = load_torch(source.config_dir, source.task, source.adapter_dir)
    if source.task in CAUSAL_TASKS:
        reference = causal_reference(model, tokenizer)
    else:
        reference = encoder_reference(model, tokenizer, source.task, source.config_dir)
    if source.adapter_dir is None:
        return Prepared(source, source.config_dir, reference)
    merged_dir = staging / "merged"
    merged_dir.mkdir(parents=True)
    for path in sorted(source.config_dir.rglob("*")):
        rel = path.relative_to(source.config_dir)
        if path.is_file() and path.suffix not in (*NOT_EXPORTED, ".safetensors") and rel.name not in _WRITTEN_BY_SAVE:
            (merged_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, merged_dir / rel)  # copies: the registry's files are hard links into its store
    # The merge stays in float32, the precision of the reference it must match: rounded back to a
    # bf16 base's dtype, W + BA loses most of a small update's bits, and the merged model answered
    # unlike the adapter it came from (docs/performance.md, Export).
    model.merge_and_unload().save_pretrained(merged_dir, safe_serialization=True)
    return Prepared(source, merged_dir, reference)


def load_torch(model_dir: Path, task: str, adapter_dir: Path | None = None) -> tuple[Any, Any]:
    """The model in float32 (an adapter applied unmerged: the reference is what is served) and its
    tokenizer; eager attention, which every exporter traces."""
    import torch
    import transformers

    auto = "AutoModelForCausalLM" if task in CAUSAL_TASKS else ENCODER_CLASSES[task]
    model = getattr(transformers, auto).from_pretrained(
        model_dir, dtype=torch.float32, use_safetensors=True, attn_implementation="eager"
    )
    if task == "sequence-classification":  # the export traces the forward that is served
        from llmos.engine.torch_backend.head_pooling import install_pooling

        model = install_pooling(model)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return model.eval(), tokenizer
