"""What a fine-tuning job asks for: OpenAI's `method` (type `supervised`, `hyperparameters`), plus
LLM OS's own settings under `method.supervised` (adapter, sequence length, schedule...).
Everything is validated before a job is queued, and "auto" is resolved once, at creation."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from llmos.errors import InvalidRequestError

ADAPTERS = ("lora", "adalora", "ia3", "prefix_tuning", "prompt_tuning", "full")
TARGETED = ("lora", "adalora")
"""Methods that adapt the layers ``target_modules`` names (IA3 takes PEFT's per-architecture default)."""
VIRTUAL_TOKEN_ADAPTERS = ("prefix_tuning", "prompt_tuning")
"""Methods that learn virtual tokens: served beside their base, for chat models only."""
# Prefix and prompt tuning train a few thousand numbers and want far larger steps (PEFT's examples).
BASE_LR = {"lora": 2e-4, "adalora": 5e-4, "ia3": 3e-3, "prefix_tuning": 1e-2, "prompt_tuning": 3e-2, "full": 2e-5}
SCHEDULES = ("linear", "cosine", "constant")


@dataclass(frozen=True)
class TrainingSpec:
    n_epochs: int = 3
    batch_size: int = 8
    learning_rate_multiplier: float = 1.0
    adapter: str = "lora"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    num_virtual_tokens: int = 20
    max_seq_length: int = 512
    packing: bool = False
    group_by_length: bool = False
    """Chat jobs: batch examples of similar length together (less padding computed)."""
    fgm_epsilon: float | None = None
    """Adversarial training (FGM on the input embeddings) with this step size; None: off."""
    augmentation_probability: float | None = None
    """EDA augmentation of classification texts: each word is touched with this probability; None: off."""
    augmentation_copies: int = 1
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.0
    lr_scheduler: str = "linear"
    early_stopping_patience: int | None = None

    @property
    def learning_rate(self) -> float:
        return BASE_LR[self.adapter] * self.learning_rate_multiplier

    def total_steps(self, examples: int) -> int:
        """Optimizer steps of the whole run on ``examples`` training examples."""
        batches = math.ceil(examples / self.batch_size)
        return math.ceil(batches / self.gradient_accumulation_steps) * self.n_epochs

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


SUPERVISED = "method.supervised"
ADAPTER = f"{SUPERVISED}.adapter"


def _number(value: Any, param: str, kind: type, low: float, high: float, auto: Any) -> Any:
    """``value`` checked to be a ``kind`` in [low, high] (None or "auto": ``auto``); an error names
    ``param``, the field's path in the request, which is where the user wrote it."""
    if value is None or value == "auto":
        return auto
    name = param.rsplit(".", 1)[-1]
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise InvalidRequestError(
            f"{name} must be {'an integer' if kind is int else 'a number'} or 'auto'", param=param
        )
    if not low <= value <= high:
        raise InvalidRequestError(f"{name} must be between {low} and {high}", param=param)
    return kind(value)


def _flag(supervised: dict[str, Any], name: str) -> bool:
    """A true/false switch under ``method.supervised`` (absent: false)."""
    value = supervised.get(name, False)
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be true or false", param=f"{SUPERVISED}.{name}")
    return value


def _hyperparameters(supervised: dict[str, Any], legacy: Any) -> dict[str, tuple[Any, str]]:
    """OpenAI's hyperparameters, each with the path it came from (for errors): ``method.supervised``'s
    win over the deprecated top-level ``hyperparameters``."""
    found: dict[str, tuple[Any, str]] = {}
    for where, given in (
        ("hyperparameters", legacy),
        (f"{SUPERVISED}.hyperparameters", supervised.get("hyperparameters")),
    ):
        if given is None:
            continue
        if not isinstance(given, dict):
            raise InvalidRequestError(f"{where} must be an object", param=where)
        found.update((name, (value, f"{where}.{name}")) for name, value in given.items())
    return found


def parse_spec(
    method: dict[str, Any] | None, legacy_hyperparameters: dict[str, Any] | None, *, training_records: int
) -> TrainingSpec:
    method = method or {"type": "supervised"}
    if not isinstance(method, dict) or method.get("type", "supervised") != "supervised":
        raise InvalidRequestError("only method.type 'supervised' is supported", param="method.type")
    supervised = method.get("supervised") or {}
    if not isinstance(supervised, dict):
        raise InvalidRequestError("method.supervised must be an object", param="method.supervised")
    hp = _hyperparameters(supervised, legacy_hyperparameters)
    unknown = set(hp) - {"n_epochs", "batch_size", "learning_rate_multiplier"}
    if unknown:
        raise InvalidRequestError(f"unknown hyperparameters {sorted(unknown)}", param=hp[min(unknown)][1])
    adapter_cfg = supervised.get("adapter") or {}
    if not isinstance(adapter_cfg, dict):
        raise InvalidRequestError("method.supervised.adapter must be an object", param="method.supervised.adapter")
    adapter = adapter_cfg.get("type", "lora")
    if adapter not in ADAPTERS:
        raise InvalidRequestError(
            f"adapter type must be one of {list(ADAPTERS)}", param="method.supervised.adapter.type"
        )
    schedule = supervised.get("lr_scheduler", "linear")
    if schedule not in SCHEDULES:
        raise InvalidRequestError(
            f"lr_scheduler must be one of {list(SCHEDULES)}", param="method.supervised.lr_scheduler"
        )
    target = adapter_cfg.get("target_modules", "all-linear")
    if not (
        target == "all-linear"
        or (isinstance(target, list) and target and all(isinstance(t, str) and t.isidentifier() for t in target))
    ):
        raise InvalidRequestError(
            "target_modules must be 'all-linear' or a list of module names",
            param="method.supervised.adapter.target_modules",
        )
    if target != "all-linear" and adapter not in TARGETED:
        raise InvalidRequestError(
            f"target_modules applies to {' and '.join(TARGETED)} only, not {adapter}",
            param="method.supervised.adapter.target_modules",
        )
    packing = _flag(supervised, "packing")
    if packing and adapter in VIRTUAL_TOKEN_ADAPTERS:
        raise InvalidRequestError(
            f"packing cannot be combined with {adapter}: its virtual tokens go before each row, not each conversation",
            param="method.supervised.packing",
        )
    group_by_length = _flag(supervised, "group_by_length")
    fgm_epsilon = _switch(supervised, "adversarial", "fgm", "epsilon", 1.0, 1e-6, 100.0)
    augmentation = supervised.get("augmentation")
    probability = _switch(supervised, "augmentation", "eda", "probability", 0.1, 0.01, 0.5, extra={"copies"})
    copies = augmentation.get("copies") if isinstance(augmentation, dict) else None
    patience = supervised.get("early_stopping_patience")

    def hyperparameter(name: str, kind: type, low: float, high: float, auto: Any) -> Any:
        value, param = hp.get(name, (None, name))
        return _number(value, param, kind, low, high, auto)

    return TrainingSpec(
        n_epochs=hyperparameter("n_epochs", int, 1, 50, 3),
        batch_size=hyperparameter("batch_size", int, 1, 256, max(1, min(8, training_records))),
        learning_rate_multiplier=hyperparameter("learning_rate_multiplier", float, 1e-3, 100.0, 1.0),
        adapter=adapter,
        lora_r=_number(adapter_cfg.get("r"), f"{ADAPTER}.r", int, 1, 256, 16),
        lora_alpha=_number(adapter_cfg.get("alpha"), f"{ADAPTER}.alpha", int, 1, 1024, 32),
        lora_dropout=_number(adapter_cfg.get("dropout"), f"{ADAPTER}.dropout", float, 0.0, 0.9, 0.05),
        target_modules=target,
        num_virtual_tokens=_number(
            adapter_cfg.get("num_virtual_tokens"), f"{ADAPTER}.num_virtual_tokens", int, 1, 512, 20
        ),
        max_seq_length=_number(supervised.get("max_seq_length"), f"{SUPERVISED}.max_seq_length", int, 16, 32768, 512),
        packing=packing,
        group_by_length=group_by_length,
        fgm_epsilon=fgm_epsilon,
        augmentation_probability=probability,
        augmentation_copies=_number(copies, f"{SUPERVISED}.augmentation.copies", int, 1, 8, 1),
        gradient_accumulation_steps=_number(
            supervised.get("gradient_accumulation_steps"), f"{SUPERVISED}.gradient_accumulation_steps", int, 1, 256, 1
        ),
        warmup_ratio=_number(supervised.get("warmup_ratio"), f"{SUPERVISED}.warmup_ratio", float, 0.0, 0.5, 0.0),
        lr_scheduler=schedule,
        early_stopping_patience=None
        if patience is None
        else _number(patience, f"{SUPERVISED}.early_stopping_patience", int, 1, 50, None),
    )


def _switch(
    supervised: dict[str, Any],
    name: str,
    kind: str,
    knob: str,
    default: float,
    low: float,
    high: float,
    *,
    extra: frozenset[str] | set[str] = frozenset(),
) -> float | None:
    """An optional ``{"type": kind, knob: number}`` setting: its number, or None when absent."""
    value = supervised.get(name)
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") != kind or set(value) - {"type", knob, *extra}:
        raise InvalidRequestError(
            f"{name} must be an object {{'type': '{kind}', '{knob}': number}}", param=f"method.supervised.{name}"
        )
    number = value.get(knob, default)
    if isinstance(number, bool) or not isinstance(number, int | float) or not low <= number <= high:
        raise InvalidRequestError(
            f"{name}.{knob} must be a number from {low} to {high}", param=f"method.supervised.{name}.{knob}"
        )
    return float(number)
