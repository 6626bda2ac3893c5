"""Parameter-efficient methods, registered by name (no if-chains over method names).

Each builder turns a TrainingSpec into a PEFT config for a task type; `full` needs none.
Chat LoRA results are saved as adapters the engine serves beside their base; every other result
is merged into plain weights and served like any other model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llmos.training.spec import TrainingSpec

AdapterBuilder = Callable[[TrainingSpec, Any], Any]
_BUILDERS: dict[str, AdapterBuilder] = {}
# Classification heads, which PEFT trains whole (modules_to_save): LoRA must not wrap them too.
# PEFT leaves them out of "all-linear" by itself for SEQ_CLS only, not for TOKEN_CLS.
HEAD_MODULES = ["classifier", "score"]


def register_adapter(name: str) -> Callable[[AdapterBuilder], AdapterBuilder]:
    def decorate(builder: AdapterBuilder) -> AdapterBuilder:
        _BUILDERS[name] = builder
        return builder

    return decorate


@register_adapter("lora")
def _lora(spec: TrainingSpec, task_type: Any) -> Any:
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=task_type,
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=spec.target_modules,
        exclude_modules=HEAD_MODULES if task_type in (TaskType.SEQ_CLS, TaskType.TOKEN_CLS) else None,
    )


@register_adapter("ia3")
def _ia3(spec: TrainingSpec, task_type: Any) -> Any:
    from peft import IA3Config

    return IA3Config(task_type=task_type)


def wrap_model(model: Any, spec: TrainingSpec, task: str) -> Any:
    """``model`` ready to train: itself for full fine-tuning, else wrapped by its PEFT method.
    ``task`` is PEFT's task type name (``CAUSAL_LM``, ``SEQ_CLS``)."""
    if spec.adapter == "full":
        return model
    from peft import TaskType, get_peft_model

    return get_peft_model(model, _BUILDERS[spec.adapter](spec, TaskType[task]))


def merged(model: Any, spec: TrainingSpec) -> Any:
    """Plain weights for serving: adapters folded into the base."""
    return model if spec.adapter == "full" else model.merge_and_unload()


def save_for_serving(model: Any, spec: TrainingSpec, out: Path, *, final: bool = True) -> bool:
    """Write what the engine serves: a LoRA stays an adapter (megabytes, served beside its resident
    base in mixed batches); a full fine-tune is saved in bf16; other methods are folded into full
    weights, which changes the model, so only for the ``final`` result. False: nothing written."""
    if spec.adapter == "lora":
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
