"""A fine-tuning job's peak memory, estimated when the job is created from what it already knows:
its base model's shapes (``config.json``) and parameter count (read from its safetensors headers
at registration), its method, batch size, sequence length and data. It is the pre-training
estimate (``model_presets.estimate_memory``) with the trained parameters of the job's method, plus
what the worker process holds before it trains; a Ray cluster reserves it for the job's worker
(``cluster.jobs``). The estimate is an upper bound: batches count as padded to ``max_seq_length``
and weights as fp32, as the trainers load them whatever the stored dtype; docs/scaling.md has it
measured against real runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeGuard

from llmos.training.model_presets import MemoryEstimate, ModelDims, estimate_memory
from llmos.training.spec import VIRTUAL_TOKEN_ADAPTERS, TrainingSpec

WORKER_RUNTIME_BYTES = 768 << 20
"""What a worker holds before it trains: the interpreter with torch, transformers, PEFT and the
platform imported, the tokenizer, and the allocator's slack (measured in docs/scaling.md)."""
BYTES_PER_DATA_BYTE = 24
"""Memory per byte of a fine-tuning file: its lines parsed, and each example's token ids and
labels as Python lists (about 70 bytes per token of about 4 bytes of text)."""
ATTENTION_PER_HEAD_TOKEN = 12 * 256
"""Bytes per attention head, layer and token held beyond the layers' counted inputs and outputs:
what the measured 256-token runs needed (docs/scaling.md), the size of an fp32 score row of that
context and its two companions. Taken as linear in tokens, not as the context's square: the
attention kernel torch 2.13 runs on CPU (scaled_dot_product_attention, padding mask or not) keeps
no score matrix for the backward pass (2,048 tokens: 52-64 MiB a layer, not the 144 MiB of one fp32
copy). Longer contexts than 256 are not measured."""
LANGUAGE_MODEL_TASKS = ("chat", "dpo")
"""Tasks whose model scores the vocabulary at every token (encoders' heads score a few labels)."""


def model_shapes(model_dir: Path) -> tuple[ModelDims, int] | None:
    """The transformer's shapes and vocabulary size from a model's ``config.json``; None where it
    does not name them (an architecture with other field names, or no config)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    config = config.get("text_config", config) if isinstance(config.get("text_config"), dict) else config
    hidden, heads, vocab = config.get("hidden_size"), config.get("num_attention_heads"), config.get("vocab_size")
    if not (_positive(hidden) and _positive(heads) and _positive(vocab)) or hidden % heads:
        return None
    values: dict[str, Any] = {
        "hidden_size": hidden,
        "num_hidden_layers": config.get("num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": config.get("num_key_value_heads") or heads,
        "intermediate_size": config.get("intermediate_size") or 4 * hidden,
    }
    if not all(_positive(v) for v in values.values()):
        return None
    return ModelDims(**values), vocab


def trainable_parameters(dims: ModelDims, spec: TrainingSpec, parameters: int, *, labels: int = 0) -> int:
    """The parameters the optimizer steps under the job's method: all of them for ``full``; an
    adapter's own (LoRA and AdaLoRA counted on every linear layer of each block, the most
    ``target_modules`` can name), with a classifier's head, which PEFT trains whole."""
    if spec.adapter == "full":
        return parameters
    h, kv, inner = dims.hidden_size, dims.num_key_value_heads * dims.head_dim, dims.intermediate_size
    layers = dims.num_hidden_layers
    head = h * (h + labels) if labels else 0
    if spec.adapter in ("lora", "adalora"):
        # q, k, v, o, gate, up, down as (inputs + outputs); AdaLoRA adds a singular value per rank
        linear = (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + inner) + (inner + h)
        return layers * spec.lora_r * (linear + 7) + head
    if spec.adapter == "ia3":
        return layers * (2 * kv + inner) + head  # a scale per output of k, v and down
    if spec.adapter == "prefix_tuning":
        return spec.num_virtual_tokens * layers * 2 * h + head  # a key and a value per layer
    return spec.num_virtual_tokens * h + head  # prompt tuning: the virtual tokens' embeddings


def fine_tuning_memory(
    model_dir: Path, parameters: int | None, spec: TrainingSpec, task: str, *, data_bytes: int, labels: int = 0
) -> int | None:
    """Bytes the worker of a fine-tuning job on the model in ``model_dir`` holds at its peak, an
    upper estimate; None where the model's shapes cannot be read (the caller falls back to a fixed
    figure). ``parameters``: the model's, as registered (None: counted from its shapes);
    ``data_bytes``: the training and validation files'; ``labels``: a classifier's classes."""
    estimate = fine_tuning_estimate(model_dir, parameters, spec, task, data_bytes=data_bytes, labels=labels)
    return None if estimate is None else estimate.total + WORKER_RUNTIME_BYTES


def fine_tuning_estimate(
    model_dir: Path, parameters: int | None, spec: TrainingSpec, task: str, *, data_bytes: int, labels: int = 0
) -> MemoryEstimate | None:
    """``fine_tuning_memory`` by what holds it, without the worker's runtime."""
    shapes = model_shapes(model_dir)
    if shapes is None:
        return None
    dims, vocab = shapes
    params = parameters if parameters else dims.parameters(vocab)
    rows = spec.batch_size * (2 if task == "dpo" else 1)  # a preference pair is scored on both sides at once
    virtual = spec.num_virtual_tokens if spec.adapter in VIRTUAL_TOKEN_ADAPTERS else 0
    copies = 1 + (spec.augmentation_copies if spec.augmentation_probability else 0)
    return estimate_memory(
        dims,
        vocab,
        batch_size=rows,
        context=spec.max_seq_length + virtual,
        corpus_bytes=data_bytes * copies,
        parameters=params,
        trainable=trainable_parameters(dims, spec, params, labels=labels),
        logits=task in LANGUAGE_MODEL_TASKS,
        bytes_per_corpus_byte=BYTES_PER_DATA_BYTE,
        method_per_layer_token=_dropout_copies(dims, spec),
        attention_per_head_token=ATTENTION_PER_HEAD_TOKEN,
        logit_bytes_per_score=20,  # fp32 logits, their shifted copy, log-softmax and two gradients
        checkpointed=True,
    )


def _dropout_copies(dims: ModelDims, spec: TrainingSpec) -> int:
    """Bytes per layer and token LoRA's dropout saves: a dropped copy of each adapted layer's input
    (fp32) and its mask, for q, k, v, o, gate and up (hidden-sized) and down (intermediate). Added
    to the model's own activations whole, the frozen layers' inputs not taken out: measured, a LoRA
    job at long contexts holds more than a full fine-tune, and without them its estimate falls
    below its peak (docs/scaling.md)."""
    if spec.adapter not in ("lora", "adalora") or not spec.lora_dropout:
        return 0
    return (4 + 1) * (6 * dims.hidden_size + dims.intermediate_size)


def _positive(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
