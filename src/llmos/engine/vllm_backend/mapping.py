"""The platform's requests in vLLM's terms and vLLM's outputs in the platform's, free of vllm so
they are tested without it: ``sampling_kwargs`` builds ``vllm.SamplingParams``; the other
functions read ``vllm.outputs.RequestOutput``/``CompletionOutput`` and ``vllm.logprobs.Logprob``
values by their documented attributes (``text``, ``token_ids``, ``logprobs``, ``finish_reason``;
``logprob``, ``rank``, ``decoded_token``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llmos.engine.protocol import (
    FinishReason,
    GenerationRequest,
    PromptLogprob,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
)
from llmos.errors import InvalidRequestError

_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}


def refuse_unsupported(request: GenerationRequest) -> None:
    """400 for what this platform offers but its vLLM backend does not do yet."""
    if request.grammar is not None:
        raise InvalidRequestError(
            "structured outputs (a JSON schema, a grammar or a forced tool call) are not available on models "
            "served by vLLM yet; set gpu_backend = torch to serve this model on the CPU with them",
            param="response_format",
        )


def sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for ``params`` (without ``output_kind``).

    A request that only scores its prompt (``max_tokens`` 0) asks vLLM for one token, which the
    runner drops: vLLM always generates at least one."""
    return {
        "n": params.n,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": max(1, params.max_tokens),
        "stop": list(params.stop),
        "seed": params.seed,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "ignore_eos": params.ignore_eos,
        # vLLM returns the chosen token's logprob and this many alternatives; None: no logprobs at all.
        "logprobs": params.top_logprobs if params.logprobs else None,
        "prompt_logprobs": params.prompt_logprobs,
        "skip_special_tokens": True,
    }


def finish_reason(value: str | None) -> FinishReason | None:
    """vLLM's finish reason (``stop`` also for its end-of-sequence token), or None while it runs."""
    if value is None:
        return None
    return _FINISH.get(value, FinishReason.STOP)


def token_logprobs(
    token_ids: Sequence[int], steps: Sequence[Mapping[int, Any]] | None, top: int
) -> tuple[TokenLogprob, ...]:
    """The chosen tokens' logprobs and their ``top`` most likely alternatives, one entry per token;
    ``steps[i]`` is vLLM's ``{token_id: Logprob}`` for ``token_ids[i]``."""
    if steps is None:
        return ()
    entries = []
    for token, step in zip(token_ids, steps, strict=True):
        chosen = step[token]
        text = _text(chosen, token)
        alternatives = sorted(step.items(), key=lambda item: _rank(item[1]))[:top]
        entries.append(
            TokenLogprob(
                token=text,
                logprob=float(chosen.logprob),
                bytes=list(text.encode()),
                top_logprobs=[
                    TopLogprob(token=_text(lp, t), logprob=float(lp.logprob), bytes=list(_text(lp, t).encode()))
                    for t, lp in alternatives
                ],
            )
        )
    return tuple(entries)


def prompt_logprobs(
    prompt: Sequence[int], positions: Sequence[Mapping[int, Any] | None], top: int, first_text: str
) -> tuple[PromptLogprob, ...]:
    """The scored prompt: vLLM's ``prompt_logprobs`` (None at the first position, which nothing
    precedes; ``first_text`` is its token's text) for each token of ``prompt``, with the ``top``
    most likely tokens there."""
    scored = []
    for token, position in zip(prompt, positions, strict=True):
        if position is None:
            scored.append(PromptLogprob(token_id=token, token=first_text, logprob=None, rank=None))
            continue
        own = position[token]
        best = sorted(position.items(), key=lambda item: _rank(item[1]))[:top]
        scored.append(
            PromptLogprob(
                token_id=token,
                token=_text(own, token),
                logprob=float(own.logprob),
                rank=own.rank,
                top=tuple((t, _text(lp, t), float(lp.logprob)) for t, lp in best),
            )
        )
    return tuple(scored)


def _rank(logprob: Any) -> int:
    return logprob.rank if logprob.rank is not None else 1 << 30


def _text(logprob: Any, token: int) -> str:
    decoded = logprob.decoded_token
    return decoded if decoded is not None else f"<{token}>"
