"""The platform's sampling parameters in vLLM's terms and vLLM's outputs in the platform's. vLLM's
``Logprob`` values are built here with its documented attributes (``logprob``, ``rank``,
``decoded_token``); nothing is generated."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from llmos.engine.grammar import CompiledGrammar
from llmos.engine.protocol import FinishReason, GenerationRequest, GrammarSpec, PromptLogprob, SamplingParams
from llmos.engine.vllm_backend.mapping import (
    finish_reason,
    prompt_logprobs,
    refuse_unsupported,
    sampling_kwargs,
    token_logprobs,
)
from llmos.errors import InvalidRequestError


def lp(logprob: float, rank: int, text: str) -> SimpleNamespace:
    return SimpleNamespace(logprob=logprob, rank=rank, decoded_token=text)


def test_every_sampling_parameter_reaches_vllm() -> None:
    params = SamplingParams(
        max_tokens=12,
        temperature=0.7,
        top_p=0.9,
        n=3,
        stop=("\n\n", "END"),
        seed=42,
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        logprobs=True,
        top_logprobs=4,
        prompt_logprobs=2,
        ignore_eos=True,
    )
    assert sampling_kwargs(params) == {
        "n": 3,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 12,
        "stop": ["\n\n", "END"],
        "seed": 42,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.25,
        "ignore_eos": True,
        "logprobs": 4,
        "prompt_logprobs": 2,
        "skip_special_tokens": True,
    }


def test_no_logprobs_asked_is_none_for_vllm_and_logprobs_alone_is_zero_alternatives() -> None:
    assert sampling_kwargs(SamplingParams())["logprobs"] is None
    assert sampling_kwargs(SamplingParams(logprobs=True))["logprobs"] == 0


def test_a_prompt_only_scored_still_asks_vllm_for_one_token() -> None:
    """vLLM refuses max_tokens 0; the runner drops the token it makes."""
    assert sampling_kwargs(SamplingParams(max_tokens=0, prompt_logprobs=0))["max_tokens"] == 1


@pytest.mark.parametrize(
    ("vllm", "ours"),
    [("stop", FinishReason.STOP), ("length", FinishReason.LENGTH), ("abort", FinishReason.ABORT), (None, None)],
)
def test_finish_reasons(vllm: str | None, ours: FinishReason | None) -> None:
    assert finish_reason(vllm) == ours


def test_chosen_tokens_logprobs_with_their_alternatives_in_rank_order() -> None:
    # vLLM gives the chosen token and the top alternatives, keyed by token id, in no promised order.
    steps = [
        {7: lp(-0.1, 1, "Hi"), 9: lp(-2.5, 2, "Hey")},
        {5: lp(-3.0, 3, " é"), 1: lp(-0.2, 1, "!"), 2: lp(-1.9, 2, ".")},
    ]
    entries = token_logprobs([7, 5], steps, top=2)
    assert [e.token for e in entries] == ["Hi", " é"]
    assert entries[1].logprob == -3.0
    assert entries[1].bytes == list(" é".encode())
    assert [(t.token, t.logprob) for t in entries[1].top_logprobs] == [("!", -0.2), (".", -1.9)]
    assert token_logprobs([7], None, top=0) == ()


def test_a_scored_prompt_has_no_score_for_its_first_token() -> None:
    positions = [None, {4: lp(-1.5, 2, " world"), 8: lp(-0.5, 1, " there")}]
    scored = prompt_logprobs([3, 4], positions, top=1, first_text="Hello")
    assert scored == (
        PromptLogprob(token_id=3, token="Hello", logprob=None, rank=None),
        PromptLogprob(token_id=4, token=" world", logprob=-1.5, rank=2, top=((8, " there", -0.5),)),
    )


def test_structured_outputs_are_refused_with_a_400_naming_response_format() -> None:
    grammar = CompiledGrammar(GrammarSpec("regex", "a+"), prototype=None, vocab_size=10)
    request = GenerationRequest("r1", "m", [1, 2], SamplingParams(), grammar=grammar)
    with pytest.raises(InvalidRequestError) as refused:
        refuse_unsupported(request)
    assert refused.value.param == "response_format"
    refuse_unsupported(GenerationRequest("r2", "m", [1, 2], SamplingParams()))
