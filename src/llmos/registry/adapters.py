"""Adapters as registry models: a few megabytes that name the base they run on.

An adapter version is registered with its base as parent; its task, architecture and context
length are the base's. Two kinds are served beside the resident base (never a merged copy):
``lora`` (PEFT LoRA: low-rank updates applied per row in mixed batches) and ``prefix`` (PEFT
prefix tuning and prompt tuning: learned virtual tokens, which the engine turns into key/value
states placed before every prompt). Only what the engine can apply exactly is accepted here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmos.errors import ArtifactError
from llmos.registry.formats import read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FORMAT = "lora"
PREFIX_FORMAT = "prefix"
VIRTUAL_TOKENS_KEY = "prompt_embeddings"  # the one tensor PEFT saves for prompt-learning methods
MAX_VIRTUAL_TOKENS = 1024
SERVABLE_BASE_TASKS = frozenset({"chat", "completion"})
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


def is_adapter_dir(directory: Path) -> bool:
    return (directory / ADAPTER_CONFIG).is_file()


def check_lora_config(config: dict[str, Any]) -> None:
    """Raise ArtifactError unless the adapter is a LoRA the engine applies exactly."""
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


def check_virtual_token_config(config: dict[str, Any]) -> None:
    """Raise ArtifactError unless the prefix- or prompt-tuning adapter is one the engine runs exactly:
    a decoder-only model's single stack of virtual tokens (the shapes are checked against the base
    when the engine loads it)."""
    count = config.get("num_virtual_tokens")
    if not _positive(count) or not isinstance(count, int) or count > MAX_VIRTUAL_TOKENS:
        raise ArtifactError(f"{ADAPTER_CONFIG}: num_virtual_tokens must be an integer from 1 to {MAX_VIRTUAL_TOKENS}")
    if config.get("num_transformer_submodules") not in (None, 1):
        raise ArtifactError(
            "prompt-learning adapters for encoder-decoder models are not supported", code="unsupported_artifact"
        )


# PEFT type -> (registry format, the check its config must pass). Anything else must be merged first.
ADAPTER_KINDS: dict[str, tuple[str, Callable[[dict[str, Any]], None]]] = {
    "LORA": (ADAPTER_FORMAT, check_lora_config),
    "PREFIX_TUNING": (PREFIX_FORMAT, check_virtual_token_config),
    "PROMPT_TUNING": (PREFIX_FORMAT, check_virtual_token_config),
}
ADAPTER_FORMATS = frozenset(fmt for fmt, _ in ADAPTER_KINDS.values())


def adapter_format(config: dict[str, Any]) -> str:
    """The registry format of a checked adapter config; ArtifactError for any the engine cannot serve."""
    peft_type = str(config.get("peft_type", "")).upper()
    kind = ADAPTER_KINDS.get(peft_type)
    if kind is None:
        raise ArtifactError(
            f"only LoRA, prefix-tuning and prompt-tuning adapters are served beside their base (this one is "
            f"{peft_type or 'unknown'}); merge it into its base and register the merged model",
            code="unsupported_artifact",
        )
    fmt, check = kind
    check(config)
    return fmt


def virtual_token_width(peft_type: str, base_config: dict[str, Any]) -> int:
    """How wide each saved virtual token is for a base with this ``config.json``: prompt tuning
    learns input embeddings; prefix tuning learns every layer's keys and values directly."""
    if peft_type.upper() == "PROMPT_TUNING":
        return int(base_config["hidden_size"])
    return kv_width(base_config)


def kv_width(base_config: dict[str, Any]) -> int:
    """Numbers a decoder keeps per token in its key/value cache: keys and values of every layer."""
    hidden, heads = int(base_config["hidden_size"]), int(base_config["num_attention_heads"])
    kv_heads = int(base_config.get("num_key_value_heads") or heads)
    head_dim = int(base_config.get("head_dim") or hidden // heads)
    return int(base_config["num_hidden_layers"]) * 2 * kv_heads * head_dim


def check_virtual_tokens_fit(directory: Path, config: dict[str, Any], base_config: dict[str, Any]) -> None:
    """Raise ArtifactError unless the saved virtual tokens have the shape this base needs (read from
    the safetensors header only)."""
    from safetensors import safe_open

    expected = [int(config["num_virtual_tokens"]), virtual_token_width(str(config["peft_type"]), base_config)]
    with safe_open(directory / ADAPTER_WEIGHTS, framework="pt") as f:
        if VIRTUAL_TOKENS_KEY not in set(f.keys()):
            raise ArtifactError(f"{ADAPTER_WEIGHTS} has no {VIRTUAL_TOKENS_KEY!r} tensor", code="unsupported_artifact")
        shape = list(f.get_slice(VIRTUAL_TOKENS_KEY).get_shape())
    if shape != expected:
        raise ArtifactError(
            f"the adapter's virtual tokens have shape {shape}, but its base needs {expected}; "
            "was it trained on another base model?",
            code="unsupported_artifact",
        )


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def read_adapter_config(directory: Path) -> dict[str, Any]:
    """The checked adapter config of ``directory``, which must also hold the weights."""
    config = read_json(directory / ADAPTER_CONFIG)
    adapter_format(config)
    if not (directory / ADAPTER_WEIGHTS).is_file():
        raise ArtifactError(f"the adapter has no {ADAPTER_WEIGHTS}", code="unsupported_artifact")
    return config


def adapter_rank(config: dict[str, Any]) -> int:
    """The largest LoRA rank of a checked LoRA adapter config: ``r``, or a larger one in its ``rank_pattern``."""
    return int(max([config["r"], *(config.get("rank_pattern") or {}).values()]))
