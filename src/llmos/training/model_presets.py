"""The Llama-architecture models pre-training builds: size presets or explicit dimensions, their
``LlamaConfig``, parameter count, and the memory a training run of them needs, so a job that
could not fit is refused before it is queued (docs/fine-tuning.md lists the presets)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from llmos.errors import InvalidRequestError


@dataclass(frozen=True)
class ModelDims:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def parameters(self, vocab_size: int) -> int:
        """Parameters of the model, its input and output embeddings tied (one matrix)."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        attention = 2 * h * h + 2 * h * kv
        mlp = 3 * h * self.intermediate_size
        return vocab_size * h + self.num_hidden_layers * (attention + mlp + 2 * h) + h


PRESETS = {
    "tiny": ModelDims(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, intermediate_size=768
    ),
    "small": ModelDims(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, intermediate_size=1536
    ),
}
"""Size presets; a job's ``model`` is ``llama-<preset>`` (or ``llama`` with every dimension given)."""
MODEL_PREFIX = "llama"
_BOUNDS = {
    "hidden_size": (16, 8192),
    "num_hidden_layers": (1, 128),
    "num_attention_heads": (1, 128),
    "num_key_value_heads": (1, 128),
    "intermediate_size": (16, 32768),
}


def resolve_dims(model: Any, architecture: Any, param: str) -> tuple[str, ModelDims]:
    """The preset a job's ``model`` names (``llama-tiny``...) with ``architecture``'s fields over
    it, or, for ``llama``, the dimensions ``architecture`` gives in full; each error names its field."""
    presets = [f"{MODEL_PREFIX}-{name}" for name in PRESETS]
    if model != MODEL_PREFIX and model not in presets:
        raise InvalidRequestError(
            f"pre-training builds a new model: model must be one of {[*presets, MODEL_PREFIX]} "
            f"(a preset, or '{MODEL_PREFIX}' with every dimension in {param})",
            param="model",
            code="unsupported_model",
        )
    if architecture is None:
        architecture = {}
    if not isinstance(architecture, dict):
        raise InvalidRequestError(f"{param} must be an object", param=param)
    unknown = sorted(set(architecture) - set(_BOUNDS))
    if unknown:
        raise InvalidRequestError(
            f"unknown field {unknown[0]}; known are {sorted(_BOUNDS)}", param=f"{param}.{unknown[0]}"
        )
    base = PRESETS[model.split("-", 1)[1]].as_dict() if model != MODEL_PREFIX else {}
    missing = sorted(set(_BOUNDS) - set(base) - set(architecture))
    if missing:
        raise InvalidRequestError(f"model '{MODEL_PREFIX}' needs {param}.{missing[0]}", param=f"{param}.{missing[0]}")
    values = {**base, **architecture}
    for name, (low, high) in _BOUNDS.items():
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InvalidRequestError(f"{name} must be an integer from {low} to {high}", param=f"{param}.{name}")
    dims = ModelDims(**values)
    if dims.hidden_size % dims.num_attention_heads or dims.head_dim % 2:
        raise InvalidRequestError(
            "hidden_size must be num_attention_heads times an even head size (rotary embeddings rotate pairs)",
            param=f"{param}.hidden_size",
        )
    if dims.num_attention_heads % dims.num_key_value_heads:
        raise InvalidRequestError(
            "num_key_value_heads must divide num_attention_heads", param=f"{param}.num_key_value_heads"
        )
    return model, dims


def llama_config(dims: ModelDims, vocab_size: int, context: int, *, bos_id: int | None, eos_id: int) -> Any:
    """A ``LlamaConfig`` of ``dims``: embeddings tied (at these sizes the output matrix would be a
    large share of the parameters), no biases, no dropout (a resumed run draws no random masks)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=context,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        rms_norm_eps=1e-5,
        hidden_size=dims.hidden_size,
        num_hidden_layers=dims.num_hidden_layers,
        num_attention_heads=dims.num_attention_heads,
        num_key_value_heads=dims.num_key_value_heads,
        intermediate_size=dims.intermediate_size,
    )


FP32, BF16 = 4, 2
STEPPED_BYTES = 3 * FP32
"""Per trained parameter beside its weight: its gradient and AdamW's two moments, each kept in fp32."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training run holds at its peak, by what holds them."""

    model: int
    """Weights (fp32, and autocast's bf16 copies), and for each trained parameter its gradient and
    AdamW's two moments (fp32)."""
    activations: int
    """Saved for the backward pass: per layer and token, and the logits of a batch."""
    vocabulary: int
    """The part of ``model`` and ``activations`` that grows with the vocabulary."""
    corpus: int
    """The tokenised corpus and the largest file's text while it is encoded."""
    checkpoint: int = 0
    """An epoch's checkpoint as it is written: the trained weights and AdamW's moments serialised,
    and the servable copy of what was trained, on top of the rest (what a step freed, the
    allocator keeps)."""

    @property
    def total(self) -> int:
        return self.model + self.activations + self.corpus + self.checkpoint


def estimate_memory(
    dims: ModelDims,
    vocab_size: int,
    *,
    batch_size: int,
    context: int,
    corpus_bytes: int,
    parameters: int | None = None,
    trainable: int | None = None,
    logits: bool = True,
    bytes_per_corpus_byte: int = 8,
    method_per_layer_token: int = 0,
    attention_per_head_token: int | None = None,
    logit_bytes_per_score: int = 14,
    checkpointed: bool = False,
) -> MemoryEstimate:
    """An upper estimate of a run's peak memory, from its shapes alone: batches of ``batch_size``
    rows padded to ``context`` tokens. ``parameters``: the model's (default: what ``dims`` and the
    vocabulary make, embeddings tied); ``trainable``: those the optimizer steps (default: all, as
    pre-training and a full fine-tune do; an adapter method steps a few). ``logits``: the model
    scores the vocabulary at every token (a language model; a classifier does not).
    ``bytes_per_corpus_byte``: what the training data holds in memory per byte of its file;
    ``method_per_layer_token``: what an adapter method saves for the backward pass beside the
    model's own, per layer and token. ``attention_per_head_token``: what attention holds per head,
    layer and token (None: 2 bytes per position of the context, pre-training's score matrices,
    which grow with its square). ``logit_bytes_per_score``: per vocabulary score of every token;
    ``checkpointed``: an epoch's checkpoint is written on top of the rest (fine-tuning's workers).
    The defaults are pre-training's, whose refusal (``pretrain_memory_mb``) they were set for."""
    params = dims.parameters(vocab_size) if parameters is None else parameters
    stepped = params if trainable is None else trainable
    tokens = batch_size * context
    attention = 2 * context if attention_per_head_token is None else attention_per_head_token
    per_layer_token = (
        4 * (12 * dims.hidden_size + 4 * dims.intermediate_size)
        + dims.num_attention_heads * attention
        + method_per_layer_token
    )
    logit_bytes = tokens * vocab_size * logit_bytes_per_score if logits else 0
    embedding = vocab_size * dims.hidden_size * (FP32 + BF16 + (STEPPED_BYTES if stepped >= params else 0))
    return MemoryEstimate(
        model=params * (FP32 + BF16) + stepped * STEPPED_BYTES,
        activations=tokens * dims.num_hidden_layers * per_layer_token + logit_bytes,
        vocabulary=embedding + logit_bytes,
        corpus=corpus_bytes * bytes_per_corpus_byte,
        checkpoint=stepped * (STEPPED_BYTES + FP32) if checkpointed else 0,
    )
