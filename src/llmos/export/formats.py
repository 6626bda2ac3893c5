"""The export formats, each registered once with what it holds and how it is built and checked.

A format refuses a model it cannot hold (``check``) before anything runs; ``build`` writes the
export (a file, or a directory offered as a tar archive) from the prepared Hugging Face
directory; ``verify`` compares it with the torch model's reference answers and returns the
report, or raises ``VerificationFailed``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from llmos.errors import InvalidRequestError, ServiceUnavailableError
from llmos.export.gguf_llama import GGUF_TYPES, check_llama_dir, write_llama_gguf
from llmos.export.onnx_encoder import ONNX_FILE, export_encoder, run_onnx
from llmos.export.source import CAUSAL_TASKS, ENCODER_CLASSES, Prepared, Source, load_torch
from llmos.export.verify import (
    PROMPTS,
    TEXTS,
    GreedyRule,
    check_encoder,
    check_greedy,
    encoder_inputs,
    encoder_module,
    llamacpp_greedy,
    run_torch,
    torch_greedy,
)

ENCODER_TASKS = frozenset(ENCODER_CLASSES)
FULL_PRECISION = GreedyRule(prompts=9, tokens=32)
"""32- and 16-bit weights (and a merged Hugging Face directory): 32 identical greedy tokens on 9 of 10 prompts."""
BF16_ARITHMETIC = GreedyRule(prompts=9, tokens=16)
"""bf16 weights are computed in bf16 (llama.cpp rounds the activations to bf16 in its products),
which parts from float32 within 32 tokens as torch's own bf16 does: 16 identical greedy tokens
on 9 of 10 prompts (ADR 0023, measured on SmolLM2)."""
QUANTISED_8BIT = GreedyRule(prompts=7, tokens=16)
"""8-bit blocks move near-tied logits: 16 identical greedy tokens on 7 of 10 prompts (ADR 0023)."""
GGUF_RULES = {"f32": FULL_PRECISION, "f16": FULL_PRECISION, "bf16": BF16_ARITHMETIC, "q8_0": QUANTISED_8BIT}


@dataclass(frozen=True)
class ExportFormat:
    name: str
    tasks: frozenset[str]
    description: str
    build: Callable[[Prepared, Path], Path]
    verify: Callable[[Prepared, Path], dict[str, Any]]
    check: Callable[[Source], None] = lambda source: None
    needs: tuple[str, ...] = ()
    """Python modules it needs at export time (optional extras): missing, the format is 503."""


FORMATS: dict[str, ExportFormat] = {}


def register(fmt: ExportFormat) -> ExportFormat:
    FORMATS[fmt.name] = fmt
    return fmt


def check_export(fmt_name: object, source: Source) -> ExportFormat:
    """The format to export ``source`` as; 400 for an unknown format or one that cannot hold this
    model, 503 when what it needs is not installed. Nothing has run yet."""
    fmt = FORMATS.get(fmt_name) if isinstance(fmt_name, str) else None
    if fmt is None:
        raise InvalidRequestError(f"format must be one of {', '.join(FORMATS)}", param="format")
    if source.task not in fmt.tasks:
        raise InvalidRequestError(
            f"{fmt.name} holds {' or '.join(sorted(fmt.tasks))} models; {source.record.name} is a {source.task} model",
            param="format",
            code="unsupported_export",
        )
    missing = [m for m in fmt.needs if importlib.util.find_spec(m) is None]
    if missing:
        raise ServiceUnavailableError(
            f"{fmt.name} export needs {', '.join(missing)}: install llmos with the export and gguf extras",
            code="export_unavailable",
        )
    fmt.check(source)
    return fmt


# -- Hugging Face directory -----------------------------------------------------------------------
def _build_hf(prepared: Prepared, out: Path) -> Path:
    for path in prepared.files():
        dest = out / path.relative_to(prepared.model_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, dest)  # read only from here on: a link costs no copy
        except OSError:
            shutil.copyfile(path, dest)
    return out


def _verify_hf(prepared: Prepared, out: Path) -> dict[str, Any]:
    task, reference = prepared.source.task, prepared.reference
    model, tokenizer = load_torch(out, task)
    if task in CAUSAL_TASKS:
        assert reference.prompt_ids is not None
        tokenized = [list(tokenizer(p).input_ids) for p in PROMPTS]
        return check_greedy(reference, torch_greedy(model, reference.prompt_ids), FULL_PRECISION, tokenized)
    assert reference.inputs is not None
    return check_encoder(reference, run_torch(encoder_module(model, task, out), reference.inputs))


register(
    ExportFormat(
        "hf",
        CAUSAL_TASKS | ENCODER_TASKS,
        "Hugging Face directory (safetensors, config, tokenizer; a LoRA adapter merged into its base), as a tar",
        _build_hf,
        _verify_hf,
    )
)


# -- GGUF -------------------------------------------------------------------------------------------
def _build_gguf(gguf_type: str, prepared: Prepared, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    record = prepared.source.record
    path = out / f"{re.sub(r'[^A-Za-z0-9._-]', '_', record.name)}-v{record.version}.{gguf_type.upper()}.gguf"
    return write_llama_gguf(prepared.model_dir, path, gguf_type, name=record.name)


def _verify_gguf(rule: GreedyRule, prepared: Prepared, path: Path) -> dict[str, Any]:
    import torch

    reference = prepared.reference
    assert reference.prompt_ids is not None
    tokenized, answers = llamacpp_greedy(path, PROMPTS, reference.prompt_ids, threads=torch.get_num_threads())
    return check_greedy(reference, answers, rule, tokenized)


for _type in GGUF_TYPES:
    register(
        ExportFormat(
            f"gguf-{_type}",
            CAUSAL_TASKS,
            f"GGUF file, {_type} weights, for llama.cpp (Llama-family models)",
            partial(_build_gguf, _type),
            partial(_verify_gguf, GGUF_RULES[_type]),
            check=lambda source: check_llama_dir(source.config_dir),
            needs=("llama_cpp",),
        )
    )


# -- ONNX -------------------------------------------------------------------------------------------
def _build_onnx(prepared: Prepared, out: Path) -> Path:
    """model.onnx beside the tokenizer, config (labels) and pooling files it needs; no safetensors."""
    out.mkdir(parents=True, exist_ok=True)
    for path in prepared.files():
        if path.suffix != ".safetensors":
            dest = out / path.relative_to(prepared.model_dir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
    task = prepared.source.task
    model, tokenizer = load_torch(prepared.model_dir, task)
    # Traced on a smaller batch than the one verified: the file must take any batch and length.
    example = encoder_inputs(tokenizer, TEXTS[:3])
    export_encoder(encoder_module(model, task, prepared.model_dir), task, example, out / ONNX_FILE)
    return out


def _verify_onnx(prepared: Prepared, out: Path) -> dict[str, Any]:
    reference = prepared.reference
    assert reference.inputs is not None
    return check_encoder(reference, run_onnx(out / ONNX_FILE, reference.inputs))


register(
    ExportFormat(
        "onnx",
        ENCODER_TASKS,
        "ONNX model (pooled embeddings or the head's logits) with its tokenizer, as a tar",
        _build_onnx,
        _verify_onnx,
        needs=("onnx", "onnxscript", "onnxruntime"),
    )
)
