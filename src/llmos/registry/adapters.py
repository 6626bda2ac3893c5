"""LoRA adapters as registry models: a few megabytes that name the base they run on.

An adapter version is registered with format ``lora`` and its base as parent; its task,
architecture and context length are the base's. The engine serves it beside the resident base
(never a merged copy), so only what it can apply exactly is accepted here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from llmos.errors import ArtifactError
from llmos.registry.formats import read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FORMAT = "lora"
SERVABLE_BASE_TASKS = frozenset({"chat", "completion"})
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


def is_adapter_dir(directory: Path) -> bool:
    return (directory / ADAPTER_CONFIG).is_file()


def check_lora_config(config: dict[str, Any]) -> None:
    """Raise ArtifactError unless the adapter is a LoRA the engine applies exactly."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ArtifactError(
            f"only LoRA adapters are served beside their base (this one is {peft_type or 'unknown'}); "
            "merge it into its base and register the merged model",
            code="unsupported_artifact",
        )
    for flag, why in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan-in/fan-out (Conv1D) layers")):
        if config.get(flag):
            raise ArtifactError(
                f"LoRA adapters with {why} are not supported; merge it into its base instead",
                code="unsupported_artifact",
            )
    if config.get("modules_to_save"):
        raise ArtifactError(
            "LoRA adapters that also train whole modules (modules_to_save) are not supported",
            code="unsupported_artifact",
        )
    for key in ("r", "lora_alpha"):
        if not _positive(config.get(key)):
            raise ArtifactError(f"{ADAPTER_CONFIG}: {key} must be a positive number")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        # Keys are module names (PEFT also takes regular expressions: never compiled here).
        if not isinstance(patterns, dict) or not all(
            isinstance(k, str) and _MODULE_NAME.fullmatch(k) and _positive(v) for k, v in patterns.items()
        ):
            raise ArtifactError(f"{ADAPTER_CONFIG}: {key} must map module names to positive numbers")


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def read_adapter_config(directory: Path) -> dict[str, Any]:
    """The checked adapter config of ``directory``, which must also hold the weights."""
    config = read_json(directory / ADAPTER_CONFIG)
    check_lora_config(config)
    if not (directory / ADAPTER_WEIGHTS).is_file():
        raise ArtifactError(f"the adapter has no {ADAPTER_WEIGHTS}", code="unsupported_artifact")
    return config
