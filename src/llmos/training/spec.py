"""What a fine-tuning job asks for: OpenAI's `method` (type `supervised` or `dpo`, `hyperparameters`),
plus LLM OS's own settings beside them under `method.<type>` (adapter, sequence length, schedule...).
Everything is validated before a job is queued, and "auto" is resolved once, at creation."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from llmos.engine.protocol import HEAD_POOLINGS
from llmos.errors import InvalidRequestError

ADAPTERS = ("lora", "adalora", "ia3", "prefix_tuning", "prompt_tuning", "full")
TARGETED = ("lora", "adalora")
"""Methods that adapt the layers ``target_modules`` names (IA3 takes PEFT's per-architecture default)."""
VIRTUAL_TOKEN_ADAPTERS = ("prefix_tuning", "prompt_tuning")
"""Methods that learn virtual tokens: served beside their base, for chat models only."""
# Prefix and prompt tuning train a few thousand numbers and want far larger steps (PEFT's examples).
BASE_LR = {"lora": 2e-4, "adalora": 5e-4, "ia3": 3e-3, "prefix_tuning": 1e-2, "prompt_tuning": 3e-2, "full": 2e-5}
SCHEDULES = ("linear", "cosine", "constant")
METHODS = ("supervised", "dpo")
HYPERPARAMETERS: dict[str, tuple[str, ...]] = {"supervised": ("n_epochs", "batch_size", "learning_rate_multiplier")}
HYPERPARAMETERS["dpo"] = (*HYPERPARAMETERS["supervised"], "beta")
HYPERPARAMETERS["pretrain"] = HYPERPARAMETERS["supervised"]
"""OpenAI's hyperparameters of each method (the rest of a method's settings are LLM OS's)."""
DPO_BETA = 0.1
"""DPO's default beta (the DPO paper's and TRL's)."""
PRETRAIN_LR = 1e-3
"""Pre-training's base learning rate: every weight starts random, so steps far larger than a fine-tune's."""


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
    pooling: str | None = None
    """Sequence classification: what the head reads, ``cls`` or ``mean`` (engine head_pooling);
    None: what the base was saved with (``cls`` for a fresh head)."""
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.0
    weight_decay: float | None = None
    """AdamW's weight decay; None: the task's own (0.01 for encoders, 0 for causal models)."""
    lr_scheduler: str = "linear"
    early_stopping_patience: int | None = None
    method: str = "supervised"
    """OpenAI's method.type: ``supervised``, ``dpo`` or ``pretrain`` (see pretrain_spec)."""
    beta: float | None = None
    """DPO: how far the policy may move from the reference (None for supervised jobs)."""
    gpus: float | None = None
    """GPUs the job's worker asks for (its trainer then runs on one, ``training.device``); None:
    the server's ``ray_job_gpus``."""

    @property
    def section(self) -> str:
        """Where the request holds this method's settings, for errors: ``method.supervised``..."""
        return f"method.{self.method}"

    @property
    def learning_rate(self) -> float:
        base = PRETRAIN_LR if self.method == "pretrain" else BASE_LR[self.adapter]
        return base * self.learning_rate_multiplier

    def total_steps(self, examples: int) -> int:
        """Optimizer steps of the whole run on ``examples`` training examples."""
        batches = math.ceil(examples / self.batch_size)
        return math.ceil(batches / self.gradient_accumulation_steps) * self.n_epochs

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def _flag(supervised: dict[str, Any], name: str, section: str) -> bool:
    """A true/false switch under ``section`` (absent: false)."""
    value = supervised.get(name, False)
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be true or false", param=f"{section}.{name}")
    return value


def _hyperparameters(supervised: dict[str, Any], legacy: Any, section: str) -> dict[str, tuple[Any, str]]:
    """OpenAI's hyperparameters, each with the path it came from (for errors): ``section``'s (e.g.
    ``method.supervised``) win over the deprecated top-level ``hyperparameters``."""
    found: dict[str, tuple[Any, str]] = {}
    for where, given in (
        ("hyperparameters", legacy),
        (f"{section}.hyperparameters", supervised.get("hyperparameters")),
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
    kind = method.get("type", "supervised") if isinstance(method, dict) else None
    if kind not in METHODS:
        raise InvalidRequestError("method.type must be 'supervised', 'dpo' or 'pretrain'", param="method.type")
    section = f"method.{kind}"
    other = next((m for m in METHODS if m != kind and m in method), None)
    if other is not None:
        raise InvalidRequestError(f"method.{other} does not apply to method.type '{kind}'", param=f"method.{other}")
    supervised = method.get(kind) or {}
    if not isinstance(supervised, dict):
        raise InvalidRequestError(f"{section} must be an object", param=section)
    hp = _hyperparameters(supervised, legacy_hyperparameters, section)
    unknown = set(hp) - set(HYPERPARAMETERS[kind])
    if unknown:
        raise InvalidRequestError(f"unknown hyperparameters {sorted(unknown)}", param=hp[min(unknown)][1])
    adapter_cfg = supervised.get("adapter") or {}
    if not isinstance(adapter_cfg, dict):
        raise InvalidRequestError(f"{section}.adapter must be an object", param=f"{section}.adapter")
    adapter = adapter_cfg.get("type", "lora")
    if adapter not in ADAPTERS:
        raise InvalidRequestError(f"adapter type must be one of {list(ADAPTERS)}", param=f"{section}.adapter.type")
    schedule = supervised.get("lr_scheduler", "linear")
    if schedule not in SCHEDULES:
        raise InvalidRequestError(f"lr_scheduler must be one of {list(SCHEDULES)}", param=f"{section}.lr_scheduler")
    target = adapter_cfg.get("target_modules", "all-linear")
    if not (
        target == "all-linear"
        or (isinstance(target, list) and target and all(isinstance(t, str) and t.isidentifier() for t in target))
    ):
        raise InvalidRequestError(
            "target_modules must be 'all-linear' or a list of module names",
            param=f"{section}.adapter.target_modules",
        )
    if target != "all-linear" and adapter not in TARGETED:
        raise InvalidRequestError(
            f"target_modules applies to {' and '.join(TARGETED)} only, not {adapter}",
            param=f"{section}.adapter.target_modules",
        )
    packing = _flag(supervised, "packing", section)
    if packing and adapter in VIRTUAL_TOKEN_ADAPTERS:
        raise InvalidRequestError(
            f"packing cannot be combined with {adapter}: its virtual tokens go before each row, not each conversation",
            param=f"{section}.packing",
        )
    group_by_length = _flag(supervised, "group_by_length", section)
    pooling = supervised.get("pooling")
    if pooling is not None and pooling not in HEAD_POOLINGS:
        raise InvalidRequestError(f"pooling must be one of {list(HEAD_POOLINGS)}", param=f"{section}.pooling")
    fgm_epsilon = _switch(supervised, section, "adversarial", "fgm", "epsilon", 1.0, 1e-6, 100.0)
    augmentation = supervised.get("augmentation")
    probability = _switch(supervised, section, "augmentation", "eda", "probability", 0.1, 0.01, 0.5, extra={"copies"})
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
        lora_r=_number(adapter_cfg.get("r"), f"{section}.adapter.r", int, 1, 256, 16),
        lora_alpha=_number(adapter_cfg.get("alpha"), f"{section}.adapter.alpha", int, 1, 1024, 32),
        lora_dropout=_number(adapter_cfg.get("dropout"), f"{section}.adapter.dropout", float, 0.0, 0.9, 0.05),
        target_modules=target,
        num_virtual_tokens=_number(
            adapter_cfg.get("num_virtual_tokens"), f"{section}.adapter.num_virtual_tokens", int, 1, 512, 20
        ),
        max_seq_length=_number(supervised.get("max_seq_length"), f"{section}.max_seq_length", int, 16, 32768, 512),
        packing=packing,
        group_by_length=group_by_length,
        fgm_epsilon=fgm_epsilon,
        augmentation_probability=probability,
        augmentation_copies=_number(copies, f"{section}.augmentation.copies", int, 1, 8, 1),
        pooling=pooling,
        gradient_accumulation_steps=_number(
            supervised.get("gradient_accumulation_steps"), f"{section}.gradient_accumulation_steps", int, 1, 256, 1
        ),
        warmup_ratio=_number(supervised.get("warmup_ratio"), f"{section}.warmup_ratio", float, 0.0, 0.5, 0.0),
        weight_decay=_number(supervised.get("weight_decay"), f"{section}.weight_decay", float, 0.0, 1.0, None),
        lr_scheduler=schedule,
        early_stopping_patience=None
        if patience is None
        else _number(patience, f"{section}.early_stopping_patience", int, 1, 50, None),
        method=kind,
        beta=hyperparameter("beta", float, 1e-3, 10.0, DPO_BETA) if kind == "dpo" else None,
        gpus=parse_gpus(supervised.get("gpus"), f"{section}.gpus"),
    )


def parse_gpus(value: Any, param: str) -> float | None:
    """A job's own ``gpus`` (``param`` names where it was written): a number of GPUs from 0 (train
    on CPUs) to 64, a fraction sharing one; None or "auto": the server's ``ray_job_gpus``."""
    return _number(value, param, float, 0.0, 64.0, None)


def _switch(
    supervised: dict[str, Any],
    section: str,
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
            f"{name} must be an object {{'type': '{kind}', '{knob}': number}}", param=f"{section}.{name}"
        )
    number = value.get(knob, default)
    if isinstance(number, bool) or not isinstance(number, int | float) or not low <= number <= high:
        raise InvalidRequestError(
            f"{name}.{knob} must be a number from {low} to {high}", param=f"{section}.{name}.{knob}"
        )
    return float(number)
