"""Parameter-efficient methods, registered by name (no if-chains over method names).

Each builder turns a TrainingSpec into a PEFT config for a task type and the run's length; `full`
needs none. Chat LoRA, prefix-tuning and prompt-tuning results are saved as adapters the engine
serves beside their base; every other result is merged into plain weights and served like any
other model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmos.training.device import model_device
from llmos.training.spec import VIRTUAL_TOKEN_ADAPTERS, TrainingSpec

AdapterBuilder = Callable[[TrainingSpec, Any, int], Any]  # (spec, PEFT task type, total steps) -> config
_BUILDERS: dict[str, AdapterBuilder] = {}
SERVED_AS_ADAPTERS = ("lora", "prefix_tuning", "prompt_tuning")
"""Methods whose chat results stay adapters (the engine runs them beside the resident base)."""
# Classification heads, which PEFT trains whole (modules_to_save): LoRA must not wrap them too.
# PEFT leaves them out of "all-linear" by itself for SEQ_CLS only, not for TOKEN_CLS.
HEAD_MODULES = ["classifier", "score"]
ENCODER_TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS")


def register_adapter(name: str) -> Callable[[AdapterBuilder], AdapterBuilder]:
    def decorate(builder: AdapterBuilder) -> AdapterBuilder:
        _BUILDERS[name] = builder
        return builder

    return decorate


def _low_rank(spec: TrainingSpec, task_type: Any) -> dict[str, Any]:
    """What LoRA and AdaLoRA configs share."""
    from peft import TaskType

    return {
        "task_type": task_type,
        "lora_alpha": spec.lora_alpha,
        "lora_dropout": spec.lora_dropout,
        "target_modules": spec.target_modules,
        "exclude_modules": HEAD_MODULES if task_type in (TaskType.SEQ_CLS, TaskType.TOKEN_CLS) else None,
    }


@register_adapter("lora")
def _lora(spec: TrainingSpec, task_type: Any, total_steps: int) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=spec.lora_r, **_low_rank(spec, task_type))


@register_adapter("adalora")
def _adalora(spec: TrainingSpec, task_type: Any, total_steps: int) -> Any:
    """LoRA whose rank budget is re-allocated during training: every layer starts at rank ``r``;
    after the first 10% of the steps the least important singular values are pruned until, for
    the last 20%, the average rank is ``r / 2``."""
    from peft import AdaLoraConfig

    total = max(total_steps, 3)
    return AdaLoraConfig(
        init_r=spec.lora_r,
        target_r=max(1, spec.lora_r // 2),
        **_low_rank(spec, task_type),
        total_step=total,
        tinit=total // 10,
        tfinal=total // 5,
        deltaT=max(1, total // 50),
    )


@register_adapter("ia3")
def _ia3(spec: TrainingSpec, task_type: Any, total_steps: int) -> Any:
    from peft import IA3Config

    return IA3Config(task_type=task_type)


@register_adapter("prefix_tuning")
def _prefix(spec: TrainingSpec, task_type: Any, total_steps: int) -> Any:
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=spec.num_virtual_tokens)


@register_adapter("prompt_tuning")
def _prompt(spec: TrainingSpec, task_type: Any, total_steps: int) -> Any:
    from peft import PromptTuningConfig, PromptTuningInit

    # Virtual tokens start as embeddings of real vocabulary tokens: random vectors off the
    # embedding manifold train much more slowly.
    return PromptTuningConfig(
        task_type=task_type,
        num_virtual_tokens=spec.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,
    )


def wrap_model(model: Any, spec: TrainingSpec, task: str, total_steps: int) -> Any:
    """``model`` ready to train: itself for full fine-tuning, else wrapped by its PEFT method.
    ``task`` is PEFT's task type name (``CAUSAL_LM``, ``SEQ_CLS``). Prefix and prompt tuning of
    an encoder are the engine's ``PromptedEncoder`` (what it serves; PEFT's prefix tuning needs
    ``past_key_values``, which transformers 5 encoders no longer take), seeded by torch's RNG."""
    if spec.adapter == "full":
        return model
    if spec.adapter in VIRTUAL_TOKEN_ADAPTERS and task in ENCODER_TASK_TYPES:
        from llmos.engine.torch_backend.prompted_encoder import PromptedEncoder

        prompted = PromptedEncoder(model, spec.adapter, spec.num_virtual_tokens)
        prompted.initialize()
        prompted.freeze_base(train_head=True)  # as PEFT's prompt learning trains the classifier beside
        return prompted
    from peft import TaskType, get_peft_model

    return get_peft_model(model, _BUILDERS[spec.adapter](spec, TaskType[task], total_steps))


def regularization(model: Any) -> torch.Tensor | None:
    """AdaLoRA's orthogonality penalty on its singular vectors (PEFT adds it only when the model
    computes the loss itself, which our loops do not); None for every other method."""
    config = getattr(model, "peft_config", {}).get("default")
    if config is None or str(config.peft_type) not in ("ADALORA", "PeftType.ADALORA"):
        return None
    total, count = torch.zeros(()), 0
    for name, param in model.named_parameters():
        if param.requires_grad and ("lora_A" in name or "lora_B" in name):
            cov = param @ param.T if "lora_A" in name else param.T @ param
            total = total + torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device), "fro")
            count += 1
    return config.orth_reg_weight * total / max(1, count)


def after_step(model: Any, step: int) -> None:
    """What a method does after each optimizer step: AdaLoRA re-allocates its rank budget."""
    update = getattr(getattr(model, "base_model", None), "update_and_allocate", None)
    if update is not None:
        update(step)


_SCORES = ("ipt", "exp_avg_ipt", "exp_avg_unc")
"""AdaLoRA's RankAllocator fields: each weight's latest sensitivity, and its smoothed sensitivity and
uncertainty, whose product ranks the singular values to prune."""


@dataclass(frozen=True)
class MethodState:
    """What a method keeps beside its weights that the steps after a resume depend on, as tensors
    and JSON for a checkpoint: AdaLoRA's importance scores (which choose what is pruned next) and
    its rank pattern (which, after the final allocation, re-masks the pruned ranks every step).
    Without them a resumed AdaLoRA job prunes other ranks, or fails after the final allocation."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def _rank_allocator(model: Any) -> Any:
    return getattr(getattr(model, "base_model", None), "rankallocator", None)


def method_state(model: Any) -> MethodState:
    allocator = _rank_allocator(model)
    if allocator is None:
        return MethodState()
    tensors = {f"{kind}/{name}": t for kind in _SCORES for name, t in getattr(allocator, kind).items()}
    return MethodState(tensors, {"rank_pattern": model.peft_config[allocator.adapter_name].rank_pattern})


def restore_method_state(model: Any, saved: MethodState) -> None:
    allocator = _rank_allocator(model)
    if allocator is None:
        return
    allocator.reset_ipt()
    for key, value in saved.tensors.items():
        kind, name = key.split("/", 1)
        getattr(allocator, kind)[name] = value.to(model_device(model))
    model.peft_config[allocator.adapter_name].rank_pattern = saved.meta.get("rank_pattern")


def merged(model: Any, spec: TrainingSpec) -> Any:
    """Plain weights for serving: adapters folded into the base (an encoder's virtual tokens
    cannot be folded: it saves them beside its weights)."""
    if spec.adapter == "full" or not hasattr(model, "merge_and_unload"):
        return model
    return model.merge_and_unload()


def input_limit(model: Any, spec: TrainingSpec) -> int:
    """Input tokens a training example keeps: ``max_seq_length``, less any positions the model's
    virtual tokens take of the ones it has."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return spec.max_seq_length
    return max(1, min(spec.max_seq_length, positions - getattr(model, "positions_used", 0)))


def save_merged_copy(model: Any, spec: TrainingSpec, out: Path) -> None:
    """Plain weights of ``model`` as it is now, leaving the model in training untouched: a merged
    copy (for encoders, small enough to copy at every checkpoint)."""
    merged(model if spec.adapter == "full" else copy.deepcopy(model), spec).save_pretrained(
        out, safe_serialization=True
    )


def save_for_serving(model: Any, spec: TrainingSpec, out: Path, *, final: bool = True) -> bool:
    """Write what the engine serves: a LoRA, prefix or prompt tuning stays an adapter (megabytes,
    served beside its resident base in mixed batches); a full fine-tune is saved in bf16; other
    methods are folded into full weights, which changes the model, so only for the ``final``
    result. False: nothing written."""
    if spec.adapter in SERVED_AS_ADAPTERS:
        model.save_pretrained(out, safe_serialization=True)
        return True
    if spec.adapter == "full":
        state = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
        model.save_pretrained(out, state_dict=state, safe_serialization=True)
        return True
    if not final:
        return False
    merged(model, spec).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    return True
