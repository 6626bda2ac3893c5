"""A fine-tuning job checked against its base model and files before it is queued: everything
that would otherwise fail only once a worker has started training (target modules the model
lacks, a method its architecture does not take, a tokenizer without what the task needs,
validation labels the training file lacks). The model is read cheaply: its config, built on
the meta device (no weights read), and its tokenizer."""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from llmos.engine.torch_backend.head_pooling import set_pooling
from llmos.engine.torch_backend.prompted_encoder import PromptedEncoder
from llmos.errors import InvalidRequestError, LLMOSError
from llmos.kernel.jobs import TRAINABLE
from llmos.registry.files import FileStore
from llmos.registry.service import ModelRegistry
from llmos.training.adapters import ENCODER_TASK_TYPES, HEAD_MODULES, SERVED_AS_ADAPTERS, wrap_model
from llmos.training.spec import TARGETED, VIRTUAL_TOKEN_ADAPTERS, TrainingSpec, parse_spec

log = logging.getLogger(__name__)
PEFT_TASK_TYPES = {
    "chat": "CAUSAL_LM",
    "dpo": "CAUSAL_LM",
    "sequence-classification": "SEQ_CLS",
    "token-classification": "TOKEN_CLS",
}
"""A job's task (see kernel.jobs.TRAINABLE) -> the PEFT task type its trainer wraps the model for."""
MIN_INPUT_TOKENS = 16
"""Input positions an encoder must keep beside its prompt-tuning virtual tokens (the smallest max_seq_length)."""


def check_job_body(registry: ModelRegistry, files: FileStore, tenant: str, body: dict[str, Any]) -> None:
    """Refuse (400, ``param`` naming the field) a job body that would fail after training starts.
    Only what the job store's own validation cannot see is checked here: a body it refuses anyway
    (unknown model, a bad file, a malformed method) is left to it, so its errors keep their order."""
    training_id, validation_id = body.get("training_file"), body.get("validation_file")
    if not isinstance(training_id, str) or not isinstance(validation_id, str | None):
        return
    try:
        base = registry.get(str(body.get("model", "")), tenant=tenant)
        training = files.get(tenant, training_id)
        validation = files.get(tenant, validation_id) if validation_id else None
        records = int(training.summary.get("records", 0))
        spec = parse_spec(body.get("method"), body.get("hyperparameters"), training_records=records)
    except LLMOSError:
        return
    task = TRAINABLE.get(base.task, {}).get(str(training.summary.get("format")))
    usable = [training] if validation is None else [training, validation]
    if task is None or any(
        f.status != "processed" or f.summary.get("format") != training.summary.get("format") for f in usable
    ):
        return
    if validation is not None:
        check_labels(training.summary.get("labels", {}), validation.summary.get("labels", {}))
        if bool(training.summary.get("pairs")) != bool(validation.summary.get("pairs")):
            raise InvalidRequestError(
                "validation_file must hold pairs of texts (text_pair) exactly when the training file does",
                param="validation_file",
                code="invalid_validation_file",
            )
    model_dir = registry.model_dir(base)  # hard links into the store: nothing copied
    if (model_dir / "config.json").is_file():  # an adapter model has no architecture of its own to build
        check_against_model(spec, task, model_dir, name=base.name, examples=records)


def check_labels(training: Collection[str], validation: Collection[str]) -> None:
    """Every validation label (or tag) must be one the training file teaches: the head has an output only for those."""
    unseen = sorted(set(validation) - set(training))
    if unseen:
        raise InvalidRequestError(
            f"validation_file has labels the training file lacks: {unseen[:5]}",
            param="validation_file",
            code="invalid_validation_file",
        )


def check_against_model(spec: TrainingSpec, task: str, model_dir: Path, *, name: str, examples: int) -> None:
    """What ``task`` needs of the model in ``model_dir``, and whether ``spec``'s method applies to it."""
    _check_tokenizer(task, model_dir, name)
    model = _skeleton(task, model_dir)
    if spec.adapter in TARGETED and isinstance(spec.target_modules, list):
        # A chat LoRA is served as an adapter, which the engine applies to linear layers only.
        linear_only = PEFT_TASK_TYPES[task] == "CAUSAL_LM" and spec.adapter in SERVED_AS_ADAPTERS
        check_target_modules(
            model,
            spec.target_modules,
            task,
            name,
            linear_only=linear_only,
            param=f"{spec.section}.adapter.target_modules",
        )
    if spec.adapter == "prompt_tuning" and PEFT_TASK_TYPES[task] in ENCODER_TASK_TYPES:
        positions = getattr(model.config, "max_position_embeddings", None)
        if isinstance(positions, int) and spec.num_virtual_tokens > positions - MIN_INPUT_TOKENS:
            raise InvalidRequestError(
                f"num_virtual_tokens must be at most {positions - MIN_INPUT_TOKENS} for {name}: its "
                f"{positions} input positions hold the virtual tokens and the text",
                param=f"{spec.section}.adapter.num_virtual_tokens",
            )
    if spec.pooling == "mean" and task == "sequence-classification":
        try:
            set_pooling(model, spec.pooling)
        except ValueError as exc:
            raise InvalidRequestError(
                f"{name}: {exc}", param=f"{spec.section}.pooling", code="unsupported_method"
            ) from exc
    _try_wrapping(model, spec, task, name, examples)


def check_target_modules(
    model: torch.nn.Module, targets: list[str], task: str, name: str, *, linear_only: bool, param: str
) -> None:
    """Each name in ``targets`` must be the last part of the name of one of the model's layers
    (PEFT's matching), not its task head (which trains whole), and with ``linear_only`` a linear
    layer (what the engine's adapter batches apply)."""
    layers: dict[str, set[bool]] = {}
    for qualified, module in model.named_modules():
        if qualified and not any(True for _ in module.children()):
            layers.setdefault(qualified.rsplit(".", 1)[-1], set()).add(isinstance(module, torch.nn.Linear))
    heads = [t for t in targets if t in HEAD_MODULES and PEFT_TASK_TYPES[task] in ENCODER_TASK_TYPES]
    if heads:
        raise InvalidRequestError(
            f"target_modules {heads}: the task head is trained whole, an adapter does not wrap it",
            param=param,
            code="invalid_target_modules",
        )
    missing = [t for t in targets if t not in layers or (linear_only and True not in layers[t])]
    if missing:
        linear = sorted(n for n, kinds in layers.items() if True in kinds and n not in HEAD_MODULES)
        raise InvalidRequestError(
            f"target_modules {missing} are not {'linear ' if linear_only else ''}layers of {name}; "
            f"its linear layers are {linear}",
            param=param,
            code="invalid_target_modules",
        )


def _check_tokenizer(task: str, model_dir: Path, name: str) -> None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        log.info("tokenizer of %s does not load: %s", name, exc)
        raise InvalidRequestError(
            f"{name} has no tokenizer that loads; it cannot be fine-tuned", param="model", code="unsupported_model"
        ) from exc
    if task in ("chat", "dpo") and not tokenizer.chat_template:
        raise InvalidRequestError(
            f"{name} has no chat template: chat fine-tuning formats conversations with it",
            param="model",
            code="unsupported_model",
        )
    if task in ("chat", "dpo") and tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise InvalidRequestError(
            f"{name}'s tokenizer has neither a padding nor an end-of-sequence token to pad batches with",
            param="model",
            code="unsupported_model",
        )
    if task == "token-classification" and not tokenizer.is_fast:
        raise InvalidRequestError(
            f"token classification needs a fast tokenizer (it maps sub-words to words); {name}'s is not",
            param="model",
            code="unsupported_model",
        )


def _skeleton(task: str, model_dir: Path) -> Any:
    """The model the trainer would build for ``task``, on the meta device: its layers and
    shapes, no weights read or allocated."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    auto = {
        "chat": AutoModelForCausalLM,
        "dpo": AutoModelForCausalLM,
        "sequence-classification": AutoModelForSequenceClassification,
        "token-classification": AutoModelForTokenClassification,
    }[task]
    try:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            return auto.from_config(config)
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidRequestError(
            f"the model's architecture cannot be built for {task} fine-tuning", param="model", code="unsupported_model"
        ) from exc


def _try_wrapping(model: Any, spec: TrainingSpec, task: str, name: str, examples: int) -> None:
    """Apply the job's method to the skeleton as the trainer will: what PEFT (or the encoders'
    virtual tokens) refuses of this architecture is refused now. On the meta device, where
    initialising the adapter draws nothing from the server's random state."""
    if spec.adapter == "full":
        return
    try:
        with torch.device("meta"):
            if spec.adapter in VIRTUAL_TOKEN_ADAPTERS and PEFT_TASK_TYPES[task] in ENCODER_TASK_TYPES:
                # Only built: starting its virtual tokens runs the encoder, which meta tensors cannot.
                PromptedEncoder(model, spec.adapter, spec.num_virtual_tokens)
            else:
                wrap_model(model, spec, PEFT_TASK_TYPES[task], spec.total_steps(examples))
    except (ValueError, TypeError, KeyError, AttributeError, NotImplementedError, RuntimeError) as exc:
        log.info("%s cannot be applied to %s: %s", spec.adapter, name, exc)
        targeted = spec.adapter in TARGETED and isinstance(spec.target_modules, list)
        raise InvalidRequestError(
            f"{spec.adapter} cannot be applied to {name}"
            + (f" on the modules {spec.target_modules}" if targeted else f" ({type(model).__name__})"),
            param=f"{spec.section}.adapter." + ("target_modules" if targeted else "type"),
            code="unsupported_method",
        ) from exc
