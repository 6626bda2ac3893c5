"""What a sequence classifier's head reads: the first token (``cls``, transformers' own forward:
BERT's pooler over ``[CLS]``) or the mean of the input's token states (``mean``).

An encoder trained for sentence embeddings with mean pooling (all-MiniLM-L6-v2) never learnt to
gather a summary at ``[CLS]``: its ``[CLS]`` states are alike across inputs, so a fresh head over
them starts from an almost constant input and learns slowly from few examples
(docs/performance.md, Reranking). A head over the mean reads what the base was trained to put
there. The choice is saved in the model's ``config.json`` (``CONFIG_KEY``) and installed by
``install_pooling`` wherever the model is built (training, the engine's loader, the ONNX export),
so each computes the one forward defined here.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import torch
from torch import nn

from llmos.engine.protocol import HEAD_POOLINGS
from llmos.engine.torch_backend.encoder import Pooling, pool

CONFIG_KEY = "llmos_pooling"
"""The config.json entry (absent: ``cls``). Not ModernBERT's ``classifier_pooling``: that model
pools by itself, and a name of its own keeps this forward off models that already do."""
_MEAN = Pooling(mode="mean", normalize=False)


def pooling_of(config: Any) -> str:
    return str(getattr(config, CONFIG_KEY, None) or "cls")


def set_pooling(model: Any, pooling: str) -> Any:
    """Record ``pooling`` in ``model``'s config (saved with it) and install it; ``ValueError``
    when ``model``'s head cannot read a mean (see ``install_pooling``)."""
    if pooling not in HEAD_POOLINGS:
        raise ValueError(f"pooling must be one of {list(HEAD_POOLINGS)}, not {pooling!r}")
    setattr(model.config, CONFIG_KEY, pooling)
    return install_pooling(model)


def install_pooling(model: Any) -> Any:
    """``model`` (a transformers ``...ForSequenceClassification``) computing the pooling its config
    names: unchanged for ``cls``; for ``mean`` its forward replaced by ``_mean_pooled_forward``.
    The mean needs a BERT-style head (``dropout`` then a linear ``classifier`` over the hidden
    state, nothing else); other heads (RoBERTa's and ELECTRA's read the first token themselves,
    DistilBERT's has a layer more) are refused."""
    pooling = pooling_of(model.config)
    if pooling == "cls":
        return model
    if pooling not in HEAD_POOLINGS:
        raise ValueError(f"{CONFIG_KEY} {pooling!r} in the model's config is none of {list(HEAD_POOLINGS)}")
    head = getattr(model, "classifier", None)
    head = getattr(head, "original_module", head)  # PEFT's copy of a trained head wraps the linear layer
    parts = {name for name, _ in model.named_children()}
    if (
        parts != {model.base_model_prefix, "dropout", "classifier"}
        or not isinstance(head, nn.Linear)
        or head.in_features != model.config.hidden_size
    ):
        raise ValueError(
            "mean pooling needs a BERT-style head (the encoder's states through dropout and one linear "
            f"classifier); {type(model).__name__} has another"
        )
    model.forward = MethodType(_mean_pooled_forward, model)
    return model


def _mean_pooled_forward(
    self: Any,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    **inputs: Any,
) -> Any:
    """The head's logits over the masked mean of the encoder's last token states (padding left
    out). ``labels`` are refused: the platform's trainers compute their own loss."""
    from transformers.modeling_outputs import SequenceClassifierOutput

    if labels is not None:
        raise ValueError("a mean-pooled classifier returns logits only; compute the loss from them")
    if attention_mask is None:
        reference = input_ids if input_ids is not None else inputs["inputs_embeds"][..., 0]
        attention_mask = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)
    kept = {k: v for k, v in inputs.items() if k not in ("return_dict", "output_attentions", "output_hidden_states")}
    states = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kept).last_hidden_state
    logits = self.classifier(self.dropout(pool(states, attention_mask, _MEAN)))
    return SequenceClassifierOutput(logits=logits)
