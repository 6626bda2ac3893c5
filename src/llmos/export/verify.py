"""Checks an export against the torch model it came from before it is offered.

Causal models: the same prompts, the same token ids in (and the exported tokenizer must split
each prompt as the model's own does), greedy continuations compared token by token. Encoders:
the same batch of texts, embeddings compared by cosine similarity, classifiers by their argmax
(every text, or every real token for token classification).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmos.errors import InvalidRequestError

GREEDY_TOKENS = 32
PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colours are",
    "Water boils at a temperature of 100 degrees",
    "Here is a short poem about the sea:",
    "The quick brown fox",
    "In 1969, the first people to walk on the Moon were",
    "Translate to French: good morning ->",
    "A list of fruits: apple, banana,",
)
TEXTS = (
    "A cat sits on the mat.",
    "The stock market fell sharply today.",
    "I loved this film, the acting was wonderful!",
    "How do I reset my password?",
    "Paris is the capital of France.",
    "The service was slow and the food was cold.",
    "Barack Obama visited Berlin in 2013.",
    "Quantum computers use qubits.",
    "Is my card payment still pending?",
    "What a lovely day for a walk in the park",
)


class VerificationFailed(InvalidRequestError):
    """The export does not compute what its source computes: it is not offered. Not a server
    fault but this model in this format (as a pull's corrupt artifact is the source's): the
    request's ``format`` is named, as another format of the same model may pass."""

    default_code = "export_verification_failed"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="format")


@dataclass(frozen=True)
class GreedyRule:
    """At least ``prompts`` of the probes must give ``tokens`` identical greedy tokens."""

    prompts: int
    tokens: int


@dataclass(frozen=True)
class Reference:
    """What the torch model answers on the probes: greedy token ids per prompt (``prompt_ids``
    set), or the encoder's outputs for a padded batch of ``TEXTS`` (``inputs`` set)."""

    task: str
    outputs: Any
    prompt_ids: list[list[int]] | None = None
    inputs: dict[str, np.ndarray] | None = None


def causal_reference(model: Any, tokenizer: Any) -> Reference:
    prompt_ids = [list(tokenizer(p).input_ids) for p in PROMPTS]
    return Reference("causal", torch_greedy(model, prompt_ids), prompt_ids=prompt_ids)


def torch_greedy(model: Any, prompt_ids: Sequence[list[int]], n_tokens: int = GREEDY_TOKENS) -> list[list[int]]:
    """Each prompt's ``n_tokens`` most likely next tokens, one at a time (no stop token: every
    position is compared)."""
    import torch
    from transformers import DynamicCache

    from llmos.engine.torch_backend.kv_cache import cache_argument

    # A PEFT wrapper's forward takes **kwargs: the argument's name is the wrapped model's.
    cache_name = cache_argument(model.get_base_model() if hasattr(model, "get_base_model") else model)
    answers = []
    with torch.inference_mode():
        for ids in prompt_ids:
            cache = {cache_name: DynamicCache()}  # grown in place by every call
            out = model(input_ids=torch.tensor([ids]), use_cache=True, **cache)
            tokens = [int(out.logits[0, -1].argmax())]
            while len(tokens) < n_tokens:
                out = model(input_ids=torch.tensor([tokens[-1:]]), use_cache=True, **cache)
                tokens.append(int(out.logits[0, -1].argmax()))
            answers.append(tokens)
    return answers


def llamacpp_greedy(path: Path, prompts: Sequence[str], prompt_ids: Sequence[list[int]], *, threads: int) -> Any:
    """The GGUF file in the platform's llama.cpp backend: how it tokenizes each prompt, and its
    greedy continuation of the reference's token ids."""
    from llmos.engine.llamacpp_backend.library import LlamaCpp

    longest = max(len(ids) for ids in prompt_ids) + GREEDY_TOKENS
    llama = LlamaCpp(path, n_ctx=max(256, longest), n_seq_max=1, n_batch=max(64, longest), threads=threads)
    try:
        tokenized = [llama.tokenize(p) for p in prompts]
        answers = []
        for ids in prompt_ids:
            n = len(ids)
            seq = np.zeros(n, dtype=np.int32)
            positions = np.arange(n, dtype=np.int32)
            logits = llama.decode(np.array(ids, dtype=np.int32), positions, seq, positions == n - 1)
            tokens = [int(logits[-1].argmax())]
            while len(tokens) < GREEDY_TOKENS:
                at = np.array([n + len(tokens) - 1], dtype=np.int32)
                logits = llama.decode(np.array(tokens[-1:], dtype=np.int32), at, seq[:1], np.ones(1, dtype=bool))
                tokens.append(int(logits[-1].argmax()))
            llama.forget(0)
            answers.append(tokens)
    finally:
        llama.close()
    return tokenized, answers


def check_greedy(
    reference: Reference, answers: list[list[int]], rule: GreedyRule, tokenized: list[list[int]] | None = None
) -> dict[str, Any]:
    """The report of a greedy comparison; VerificationFailed when fewer prompts than the rule needs
    agree (a prompt the export tokenizes differently does not agree)."""
    assert reference.prompt_ids is not None
    agreeing = []
    for i, (want, got) in enumerate(zip(reference.outputs, answers, strict=True)):
        same = next((k for k, (a, b) in enumerate(zip(want, got, strict=True)) if a != b), len(want))
        if tokenized is not None and tokenized[i] != reference.prompt_ids[i]:
            same = 0
        agreeing.append(same)
    passed = sum(n >= rule.tokens for n in agreeing)
    report = {
        "method": "greedy",
        "prompts": len(agreeing),
        "tokens": rule.tokens,
        "required": rule.prompts,
        "identical": passed,
        "identical_prefix": agreeing,
    }
    if tokenized is not None:
        report["tokenizer_agrees"] = sum(t == r for t, r in zip(tokenized, reference.prompt_ids, strict=True))
    if passed < rule.prompts:
        raise VerificationFailed(
            f"the export's greedy output differs from the model's: {passed} of {len(agreeing)} prompts gave "
            f"{rule.tokens} identical tokens, {rule.prompts} are required (identical prefixes: {agreeing})"
        )
    return report


# -- encoders -----------------------------------------------------------------------------------
MIN_COSINE = 0.9999


def encoder_module(model: Any, task: str, model_dir: Path) -> Any:
    """The output an encoder export is judged by, as one torch module: the pooled sentence vectors
    the platform serves (embeddings) or the head's logits (classifiers)."""
    import torch

    from llmos.engine.torch_backend.encoder import Pooling, pool

    pooling = Pooling.from_model_dir(model_dir)

    class EncoderOutputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
        ) -> torch.Tensor:
            types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **types)
            if task == "embedding":
                return pool(out.last_hidden_state.float(), attention_mask, pooling)
            return out.logits

    return EncoderOutputs().eval()


def encoder_inputs(tokenizer: Any, texts: Sequence[str] = TEXTS) -> dict[str, np.ndarray]:
    """A padded batch of ``texts`` with the inputs the model's tokenizer gives it."""
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]
    batch = tokenizer(list(texts), padding=True, return_tensors="np")
    return {name: np.asarray(batch[name], dtype=np.int64) for name in names}


def run_torch(module: Any, inputs: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return np.asarray(module(**{k: torch.from_numpy(v) for k, v in inputs.items()}).float().numpy())


def encoder_reference(model: Any, tokenizer: Any, task: str, model_dir: Path) -> Reference:
    inputs = encoder_inputs(tokenizer)
    return Reference(task, run_torch(encoder_module(model, task, model_dir), inputs), inputs=inputs)


def check_encoder(reference: Reference, outputs: np.ndarray) -> dict[str, Any]:
    """Embeddings: every text's cosine similarity at least ``MIN_COSINE``; classifiers: the same
    argmax for every text (every real token for token classification)."""
    want = np.asarray(reference.outputs, dtype=np.float64)
    got = np.asarray(outputs, dtype=np.float64)
    if got.shape != want.shape:
        raise VerificationFailed(f"the export's output has shape {list(got.shape)}, the model's {list(want.shape)}")
    if reference.task == "embedding":
        norms = np.linalg.norm(want, axis=-1) * np.linalg.norm(got, axis=-1)
        cosine = (want * got).sum(axis=-1) / np.maximum(norms, 1e-12)
        report: dict[str, Any] = {"method": "cosine", "texts": len(cosine), "required": MIN_COSINE}
        report["min_cosine"] = float(cosine.min())
        if cosine.min() < MIN_COSINE:
            raise VerificationFailed(f"the export's embeddings differ: cosine {cosine.min():.6f} < {MIN_COSINE}")
        return report
    same = want.argmax(-1) == got.argmax(-1)
    if reference.task == "token-classification":
        assert reference.inputs is not None
        same = same[reference.inputs["attention_mask"].astype(bool)]
    report = {"method": "argmax", "compared": int(same.size), "agreeing": int(same.sum()), "required": int(same.size)}
    report["max_abs_diff"] = float(np.abs(want - got).max())
    if not same.all():
        raise VerificationFailed(f"the export's classes differ from the model's on {int((~same).sum())} of {same.size}")
    return report
