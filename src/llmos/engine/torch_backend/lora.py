"""Reading a PEFT LoRA adapter into plain tensors, every check done before it touches a model.

Only what the mixed-adapter batch applies exactly is accepted: LoRA on ``nn.Linear`` layers (no
DoRA, no embedding or convolution targets, no extra trained modules; see registry.adapters).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from llmos.errors import ModelLoadError
from llmos.registry.adapters import ADAPTER_WEIGHTS, read_adapter_config

# PEFT saves keys as "base_model.model.<module path>.lora_A.weight" (the adapter name is dropped).
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


@dataclass(frozen=True)
class LoraWeights:
    """One adapter: for each target module, ``A`` (r, in) and ``B`` (out, r) with the scale folded in."""

    adapter_id: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.modules.values())

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.modules.values())


def _pattern_value(patterns: dict[str, Any], module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern: a key (a module name, checked at registration) applies
    to the module path ending in it."""
    for key, value in patterns.items():
        if module == key or module.endswith("." + key):
            return float(value)
    return default


def load_lora(
    adapter_dir: Path, adapter_id: str, shapes: dict[str, tuple[int, int]], dtype: torch.dtype
) -> LoraWeights:
    """Parse and check an adapter against the base's linear layers (``shapes``: module -> (in, out))."""
    config = read_adapter_config(adapter_dir)
    try:
        tensors = load_file(adapter_dir / ADAPTER_WEIGHTS)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot read {ADAPTER_WEIGHTS}: {exc}") from exc
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise ModelLoadError(f"adapter tensor {key!r} is not a LoRA weight of a linear layer")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, ab in parts.items():
        if module not in shapes:
            raise ModelLoadError(f"the adapter targets {module!r}, which is not a linear layer of its base model")
        if set(ab) != {"A", "B"}:
            raise ModelLoadError(f"the adapter has only half of the LoRA weights of {module!r}")
        a, b = ab["A"], ab["B"]
        fan_in, fan_out = shapes[module]
        rank = a.shape[0] if a.dim() == 2 else -1
        if a.shape != (rank, fan_in) or b.shape != (fan_out, rank):
            raise ModelLoadError(
                f"LoRA weights of {module!r} have shapes {tuple(a.shape)} and {tuple(b.shape)}; "
                f"the base layer is {fan_in} -> {fan_out}"
            )
        r = _pattern_value(rank_pattern, module, float(config["r"]))
        alpha = _pattern_value(alpha_pattern, module, float(config["lora_alpha"]))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        modules[module] = (a.to(dtype).contiguous(), (b.float() * scale).to(dtype).contiguous())
    if not modules:
        raise ModelLoadError("the adapter holds no LoRA weights")
    return LoraWeights(adapter_id, modules)


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Every linear layer of ``model`` by module path, as (in_features, out_features)."""
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
