"""Parameter-efficient methods, registered by name (no if-chains over method names).

Each builder turns a TrainingSpec into a PEFT config for a task type; `full` needs none.
Only methods whose result merges into plain weights are registered: the engine then serves a
fine-tuned model like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmos.training.spec import TrainingSpec

AdapterBuilder = Callable[[TrainingSpec, Any], Any]
_BUILDERS: dict[str, AdapterBuilder] = {}


def register_adapter(name: str) -> Callable[[AdapterBuilder], AdapterBuilder]:
    def decorate(builder: AdapterBuilder) -> AdapterBuilder:
        _BUILDERS[name] = builder
        return builder

    return decorate


@register_adapter("lora")
def _lora(spec: TrainingSpec, task_type: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        task_type=task_type,
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=spec.target_modules,
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
