"""Encoders with a task head run with learned virtual tokens: prompt tuning and prefix tuning.

Prompt tuning puts learned embeddings in front of the input's own, as PEFT's prompt tuning does
(positions, attention mask and token types extended the same way; token-classification logits
of the virtual positions dropped). Prefix tuning puts learned keys and values in front of every
layer's own. PEFT does prefix tuning through the model's ``past_key_values``, which transformers
5 encoders no longer take, so it is done here, through transformers' attention interface: the
encoder's attention modules call a registered attention function (``ATTENTION``) that prepends
the module's prefix and then runs SDPA. Training and serving use this one module, so a served
model computes what was trained, and the saved form is the encoder's own safetensors (base and
head, loadable as they are) beside ``virtual_tokens.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

METHODS = ("prompt_tuning", "prefix_tuning")
CONFIG_FILE = "virtual_tokens.json"
WEIGHTS_FILE = "virtual_tokens.safetensors"
ATTENTION = "llmos_prefix_sdpa"
MAX_VIRTUAL_TOKENS = 512
_PREFIX = "virtual_prefix"  # the parameter each attention module gets under prefix tuning
_CAPTURE = "_virtual_capture"


def _prefix_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, **kwargs: Any
) -> Any:
    """SDPA over the module's learned prefix followed by the input's keys and values."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    prefix = getattr(module, _PREFIX, None)
    capture = getattr(module, _CAPTURE, None)
    if capture is not None:  # initialising: record what the layer computes for real tokens
        capture.append((key, value))
    elif prefix is not None:
        batch = key.shape[0]
        key = torch.cat([prefix[0].to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([prefix[1].to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)
        if mask is not None:  # every query attends to every virtual token
            n = prefix.shape[2]
            seen = torch.ones(*mask.shape[:-1], n, dtype=torch.bool, device=mask.device)
            mask = torch.cat([seen if mask.dtype == torch.bool else torch.zeros_like(seen, dtype=mask.dtype), mask], -1)
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, _prefix_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def _attention_modules(model: Any) -> list[Any]:
    """The self-attention modules, in layer order (BERT-family naming)."""
    found = [m for m in model.modules() if hasattr(m, "attention_head_size") and hasattr(m, "num_attention_heads")]
    found = [m for m in found if not getattr(m, "is_cross_attention", False) and "Cross" not in type(m).__name__]
    if not found:
        raise ValueError(f"prefix tuning needs a BERT-family encoder; {type(model).__name__} has no such attention")
    return found


class PromptedEncoder(nn.Module):
    """``model`` (a transformers encoder with a task head) run with ``num_virtual_tokens`` learned
    virtual tokens. Its own weights stay frozen unless ``train_head`` unfreezes the head, as
    PEFT's prompt-learning methods train the classifier beside the virtual tokens."""

    def __init__(self, model: Any, method: str, num_virtual_tokens: int) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown virtual-token method {method!r}")
        if not 1 <= num_virtual_tokens <= MAX_VIRTUAL_TOKENS:
            raise ValueError(f"num_virtual_tokens must be from 1 to {MAX_VIRTUAL_TOKENS}")
        self.model = model
        self.method = method
        self.num_virtual_tokens = num_virtual_tokens
        self.token_level = type(model).__name__.endswith("ForTokenClassification")
        hidden = int(model.config.hidden_size)
        if method == "prompt_tuning":
            self.prompt = nn.Parameter(torch.zeros(num_virtual_tokens, hidden))
            self.layers: list[Any] = []
        else:
            _register_attention()
            self.layers = _attention_modules(model)
            for module in self.layers:
                shape = (2, module.num_attention_heads, num_virtual_tokens, module.attention_head_size)
                module.register_parameter(_PREFIX, nn.Parameter(torch.zeros(shape)))
            model.set_attn_implementation(ATTENTION)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def positions_used(self) -> int:
        """Input positions the virtual tokens take (prompt tuning puts them in the sequence)."""
        return self.num_virtual_tokens if self.method == "prompt_tuning" else 0

    def get_input_embeddings(self) -> Any:
        return self.model.get_input_embeddings()

    def virtual_parameters(self) -> list[nn.Parameter]:
        if self.method == "prompt_tuning":
            return [self.prompt]
        return [getattr(m, _PREFIX) for m in self.layers]

    @torch.no_grad()
    def initialize(self, generator: torch.Generator | None = None) -> None:
        """Start from real activations: the virtual tokens are random vocabulary tokens (their
        embeddings, or for a prefix the keys and values each layer computes for them). Random
        vectors off that manifold train far more slowly."""
        table = self.get_input_embeddings().weight
        ids = torch.randint(0, table.shape[0], (self.num_virtual_tokens,), generator=generator)
        if self.method == "prompt_tuning":
            self.prompt.copy_(table[ids].float())
            return
        captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        for module in self.layers:  # its own keys and values, with no prefix in front
            setattr(module, _CAPTURE, captured)
        try:
            self.model(input_ids=ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        finally:
            for module in self.layers:
                delattr(module, _CAPTURE)
        for module, (k, v) in zip(self.layers, captured, strict=True):
            getattr(module, _PREFIX).copy_(torch.stack([k[0], v[0]]).float())

    def freeze_base(self, *, train_head: bool) -> None:
        for name, param in self.model.named_parameters():
            param.requires_grad = name.split(".")[-1] == _PREFIX or (train_head and _is_head(name))
        for param in self.virtual_parameters():
            param.requires_grad = True

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        if self.method == "prefix_tuning":
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, **kwargs
            )
        batch, n = input_ids.shape[0], self.num_virtual_tokens
        embeds = self.get_input_embeddings()(input_ids)
        embeds = torch.cat([self.prompt.to(embeds.dtype).expand(batch, -1, -1), embeds], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
        if token_type_ids is not None:
            token_type_ids = torch.cat([token_type_ids.new_zeros(batch, n), token_type_ids], dim=1)
        out = self.model(inputs_embeds=embeds, attention_mask=attention_mask, token_type_ids=token_type_ids, **kwargs)
        if self.token_level:
            out.logits = out.logits[:, n:]
        return out

    # -- saved form ----------------------------------------------------------------------------
    def save_pretrained(self, out: Path, **kwargs: Any) -> None:
        """The encoder and head as transformers saves them, and the virtual tokens beside."""
        out = Path(out)
        own = {k: v for k, v in self.model.state_dict().items() if not k.endswith(_PREFIX)}
        self.model.save_pretrained(out, state_dict=own, safe_serialization=True)
        tensors = {"virtual_tokens": self.virtual_tensor().detach().float().contiguous()}
        save_file(tensors, str(out / WEIGHTS_FILE))
        (out / CONFIG_FILE).write_text(
            json.dumps({"method": self.method, "num_virtual_tokens": self.num_virtual_tokens})
        )

    def virtual_tensor(self) -> torch.Tensor:
        """Prompt tuning: (tokens, hidden); prefix tuning: (layers, 2, heads, tokens, head_dim)."""
        if self.method == "prompt_tuning":
            return self.prompt
        return torch.stack([getattr(m, _PREFIX) for m in self.layers])

    def load_virtual_tensor(self, tensor: torch.Tensor) -> None:
        expected = tuple(self.virtual_tensor().shape)
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"{WEIGHTS_FILE}: virtual tokens of shape {tuple(tensor.shape)}, this model needs {expected}"
            )
        with torch.no_grad():
            if self.method == "prompt_tuning":
                self.prompt.copy_(tensor)
            else:
                for module, part in zip(self.layers, tensor, strict=True):
                    getattr(module, _PREFIX).copy_(part)


def _is_head(name: str) -> bool:
    return name.split(".")[0] in ("classifier", "score")


def read_virtual_tokens(model_dir: Path) -> dict[str, Any] | None:
    """The directory's virtual-token settings, validated; None when it has none."""
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        return None
    settings = json.loads(path.read_text())
    method, count = settings.get("method"), settings.get("num_virtual_tokens")
    if method not in METHODS or not isinstance(count, int) or not 1 <= count <= MAX_VIRTUAL_TOKENS:
        raise ValueError(
            f"{CONFIG_FILE}: method must be one of {METHODS}, num_virtual_tokens from 1 to {MAX_VIRTUAL_TOKENS}"
        )
    return {"method": method, "num_virtual_tokens": count}


def load_prompted(model: nn.Module, model_dir: Path) -> nn.Module:
    """``model`` wrapped with the virtual tokens saved in ``model_dir``, or as it is when it has none."""
    settings = read_virtual_tokens(model_dir)
    if settings is None:
        return model
    wrapped = PromptedEncoder(model, settings["method"], settings["num_virtual_tokens"])
    tensors = load_file(str(model_dir / WEIGHTS_FILE))
    if set(tensors) != {"virtual_tokens"}:
        raise ValueError(f"{WEIGHTS_FILE} must hold exactly one tensor, 'virtual_tokens'")
    wrapped.load_virtual_tensor(tensors["virtual_tokens"])
    wrapped.eval()
    return wrapped
