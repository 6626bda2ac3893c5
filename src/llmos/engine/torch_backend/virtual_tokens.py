"""Prefix-tuning and prompt-tuning adapters, run as key/value states placed before every prompt.

Both PEFT methods learn ``V`` virtual tokens that sit before the real ones, which attend to them
causally and start at position ``V``. Prefix tuning learns each layer's keys and values directly;
prompt tuning learns input embeddings, whose keys and values depend on nothing after them, so
running them through the base once gives states that are exact for every later request. Either
way an adapter becomes a short, fixed cache prefix: no second copy of the base, no per-step cost
beyond ``V`` more positions to attend to, and rows of any such adapter share decode batches with
the base, LoRA adapters and each other.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import DynamicCache

from llmos.engine.torch_backend.kv_cache import cache_argument
from llmos.errors import ModelLoadError
from llmos.registry.adapters import ADAPTER_WEIGHTS, VIRTUAL_TOKENS_KEY, read_adapter_config, virtual_token_width

States = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values of (1, kv_heads, V, head_dim)


@dataclass(frozen=True)
class VirtualTokens:
    """One adapter as saved: ``weights`` (V, width) are keys and values (prefix tuning) or input
    embeddings (prompt tuning)."""

    adapter_id: str
    method: str  # PEFT's type: PREFIX_TUNING or PROMPT_TUNING
    weights: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.weights.shape[0])


def load_virtual_tokens(adapter_dir: Path, adapter_id: str, base_config: Any, dtype: torch.dtype) -> VirtualTokens:
    """Read and check an adapter against its base's config (already checked at registration;
    checked again because the base is what is loaded now)."""
    config = read_adapter_config(adapter_dir)
    try:
        weights = load_file(adapter_dir / ADAPTER_WEIGHTS)[VIRTUAL_TOKENS_KEY]
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"cannot read the virtual tokens of {ADAPTER_WEIGHTS}: {exc}") from exc
    method = str(config["peft_type"]).upper()
    expected = (int(config["num_virtual_tokens"]), virtual_token_width(method, base_config.to_dict()))
    if tuple(weights.shape) != expected:
        raise ModelLoadError(f"virtual tokens of shape {tuple(weights.shape)} do not fit this base (needs {expected})")
    return VirtualTokens(adapter_id, method, weights.to(dtype))


def prefix_states(tokens: VirtualTokens, base_config: Any) -> States:
    """Prefix tuning's saved tensor is, per virtual token, every layer's keys then values, head by
    head (PEFT's ``get_prompt`` layout)."""
    layers = int(base_config.num_hidden_layers)
    kv_heads = int(getattr(base_config, "num_key_value_heads", None) or base_config.num_attention_heads)
    per_layer = tokens.weights.view(tokens.length, layers * 2, kv_heads, -1).permute(1, 2, 0, 3)
    return [(per_layer[2 * i][None].contiguous(), per_layer[2 * i + 1][None].contiguous()) for i in range(layers)]


def prompt_states(tokens: VirtualTokens, model: Any) -> States:
    """Prompt tuning: the states the base computes for the learned embeddings at positions 0..V-1."""
    cache = DynamicCache(config=model.config)
    model(
        inputs_embeds=tokens.weights[None],
        attention_mask=torch.ones((1, tokens.length), dtype=torch.long),
        position_ids=torch.arange(tokens.length)[None],
        use_cache=True,
        logits_to_keep=1,
        **{cache_argument(model): cache},
    )
    layers: list[Any] = list(cache.layers)
    return [(layer.keys, layer.values) for layer in layers]


class VirtualPrefixes:
    """The cache states of the prompt-learning adapters in use on one model, computed on the engine
    thread (prompt tuning runs the model) and kept least recently used under a byte budget."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._states: OrderedDict[str, tuple[States, int]] = OrderedDict()
        self._used = 0

    def states(self, tokens: VirtualTokens, compute: Callable[[VirtualTokens], States]) -> States:
        hit = self._states.get(tokens.adapter_id)
        if hit is not None:
            self._states.move_to_end(tokens.adapter_id)
            return hit[0]
        states = compute(tokens)
        nbytes = sum(k.numel() * k.element_size() * 2 for k, _ in states)
        while self._states and self._used + nbytes > self.budget_bytes:
            _, (_, freed) = self._states.popitem(last=False)
            self._used -= freed
        if nbytes <= self.budget_bytes:
            self._states[tokens.adapter_id] = (states, nbytes)
            self._used += nbytes
        return states

    def evict(self, adapter_id: str) -> None:
        hit = self._states.pop(adapter_id, None)
        if hit is not None:
            self._used -= hit[1]

    def resident(self) -> list[str]:
        return list(self._states)

    @property
    def used_bytes(self) -> int:
        return self._used
