"""OpenAI's Predicted Outputs on chat completions: the ``prediction``'s text becomes tokens that
speculative decoding drafts from, as from the prompt (docs/adr/0027), so an answer that repeats
it is generated several tokens a pass. The answer is the same with or without it. Requests whose
answer is decoded one token at a time anyway are refused with 400 naming ``prediction``, as
OpenAI refuses the combinations it does not support."""

from __future__ import annotations

from llmos.api.openai.chat.schemas import ChatCompletionRequest
from llmos.config import Settings
from llmos.engine.protocol import EngineClient, ModelHandle
from llmos.errors import InvalidRequestError


async def prediction_tokens(
    req: ChatCompletionRequest, engine: EngineClient, handle: ModelHandle, settings: Settings, constrained_by: str
) -> list[int]:
    """The prediction's tokens (none without one); ``constrained_by``: the field that makes the
    request's grammar (``tools``, ``response_format``...), empty when it has none."""
    if req.prediction is None:
        return []
    if settings.speculative_decoding == "off":
        raise InvalidRequestError(
            "prediction needs speculative decoding, which this server has off (speculative_decoding)",
            param="prediction",
        )
    if not handle.info.speculates:
        raise InvalidRequestError(
            f"prediction needs speculative decoding, which {handle.name} is not served with (its backend, "
            "a LoRA adapter, int8 decode weights, or under speculative_decoding 'auto' a verify that would not "
            "reproduce its decode steps exactly: its architecture, or this CPU's products)",
            param="prediction",
        )
    sampled = req.temperature is None or req.temperature > 0
    combined = {
        "n": (req.n or 1) > 1,
        "logprobs": bool(req.logprobs),
        "presence_penalty": bool(req.presence_penalty),
        "frequency_penalty": bool(req.frequency_penalty),
        "seed with a temperature above 0": req.seed is not None and sampled,
        "tools": bool(req.tools),  # as OpenAI refuses it
        constrained_by: bool(constrained_by),
    }
    for name, used in combined.items():
        if used:
            raise InvalidRequestError(
                f"prediction cannot be combined with {name} (such answers are decoded one token at a time)",
                param="prediction",
            )
    tokens = await engine.encode_text(handle, req.prediction.text())
    if len(tokens) > handle.info.context_length:
        raise InvalidRequestError(
            f"prediction is {len(tokens)} tokens, longer than the model's context ({handle.info.context_length})",
            param="prediction",
        )
    return tokens
