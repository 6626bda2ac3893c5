"""Loads a registered model directory into a runner, safetensors only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmos.engine.config import EngineConfig
from llmos.engine.torch_backend.causal import CausalRunner
from llmos.engine.torch_backend.classifier import ClassifierRunner
from llmos.engine.torch_backend.draft_model import DraftModel, same_tokenizer
from llmos.engine.torch_backend.encoder import EncoderRunner, Pooling
from llmos.engine.torch_backend.head_pooling import install_pooling
from llmos.engine.torch_backend.prompted_encoder import load_prompted
from llmos.engine.torch_backend.token_classifier import TokenClassifierRunner
from llmos.errors import ModelLoadError

CAUSAL_TASKS = frozenset({"chat", "completion"})
# Fine-tuned encoders with a task head: task -> (transformers auto class, runner). Float32: they
# are small and latency-bound, and it keeps their scores those of evaluation.
TASK_HEADS: dict[str, tuple[str, type[ClassifierRunner] | type[TokenClassifierRunner]]] = {
    "sequence-classification": ("AutoModelForSequenceClassification", ClassifierRunner),
    "token-classification": ("AutoModelForTokenClassification", TokenClassifierRunner),
}


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def check_draft_tokenizer(name: str, tokenizer: Any, draft_name: str, draft_tokenizer: Any) -> None:
    """Raises ModelLoadError unless the draft model's token ids mean what the target's do."""
    if not same_tokenizer(tokenizer, draft_tokenizer):
        raise ModelLoadError(
            f"draft_models: {draft_name} cannot draft for {name}: their tokenizers differ "
            f"({len(draft_tokenizer)} and {len(tokenizer)} tokens, or the same ids for other text)"
        )


def load_runner(
    model_dir: Path,
    task: str,
    *,
    dtype: torch.dtype,
    context_length: int,
    config: EngineConfig,
    name: str,
    draft: tuple[str, Path] | None = None,
) -> CausalRunner | EncoderRunner | ClassifierRunner | TokenClassifierRunner:
    """``draft``: the name and directory of a chat model's draft model (``draft_models``)."""
    from transformers import AutoModel, AutoModelForCausalLM

    try:
        tokenizer = load_tokenizer(model_dir)
        if task in CAUSAL_TASKS:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
            model.eval()
            drafter = None
            if draft is not None:
                draft_name, draft_dir = draft
                check_draft_tokenizer(name, tokenizer, draft_name, load_tokenizer(draft_dir))
                small = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=dtype, use_safetensors=True).eval()
                drafter = DraftModel(small, name=draft_name, target=model, positions=context_length)
            return CausalRunner(
                model, tokenizer, context_length=context_length, config=config, name=name, draft=drafter
            )
        if task in TASK_HEADS:
            import transformers

            auto_name, runner_class = TASK_HEADS[task]
            auto_class = getattr(transformers, auto_name)
            head = auto_class.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
            if task == "sequence-classification":  # its head reads what it was trained on: a mean or [CLS]
                head = install_pooling(head)
            head.eval()
            prompted = load_prompted(head, model_dir)  # prefix or prompt tuning keeps its virtual tokens
            return runner_class(prompted, tokenizer, max_length=context_length - getattr(prompted, "positions_used", 0))
        if task == "embedding":
            # Encoders are small and latency-bound; float32 keeps embeddings identical to the reference.
            model = AutoModel.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
            model.eval()
            return EncoderRunner(model, tokenizer, Pooling.from_model_dir(model_dir), max_length=context_length)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load model {name}: {exc}") from exc
    raise ModelLoadError(f"model {name} has task {task!r}, which this backend cannot serve")
