"""Tool calls constrained under ``tool_choice: auto`` (a ``strict`` tool, or a response format
beside tools), and the masks computed ahead of each step while the forward pass runs."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from llmos.api.openai.chat.tools import Tool, parse_tool_calls, tools_grammar
from llmos.engine import GenerationRequest, SamplingParams
from llmos.engine import grammar as grammar_module
from llmos.engine.grammar import GrammarCompiler, RowMatcher, allowed_tokens
from llmos.engine.local import LocalEngine
from llmos.engine.protocol import GrammarSpec
from llmos.platform import Platform
from tests.unit.test_structured_outputs import SCHEMAS, WEATHER, tools_model  # noqa: F401  (a fixture)

STRICT_WEATHER = {**WEATHER, "function": {**WEATHER["function"], "strict": True}}
ANSWER = SCHEMAS[0]


def _compiled(tokenizer: Any, spec: GrammarSpec | None) -> Any:
    assert spec is not None
    return GrammarCompiler(tokenizer, budget=2_000_000, capacity=4).compile(spec, param="tools")


def _feed(matcher: RowMatcher, tokenizer: Any, text: str) -> bool:
    """Whether the grammar takes every token of ``text``."""
    return all(matcher.state.consume_token(t) for t in tokenizer.encode(text, add_special_tokens=False))


def _walk(matcher: RowMatcher, tokenizer: Any, rng: random.Random, steps: int = 3000) -> list[int]:
    """Tokens chosen at random among those the grammar allows, until it may end (and the coin
    says so) or it is complete."""
    eos = tokenizer.eos_token_id
    out: list[int] = []
    for _ in range(steps):
        if matcher.state.is_stopped() or (matcher.state.is_accepting() and rng.random() < 0.6):
            return out
        allowed = [t for t in allowed_tokens([matcher], len(tokenizer))[0].nonzero().flatten().tolist() if t != eos]
        if not allowed:
            return out
        token = rng.choice(allowed)
        grammar_module.advance(matcher, token)
        out.append(token)
    raise AssertionError("the walk did not end")


def test_a_strict_tool_under_auto_allows_text_and_constrains_a_call_once_begun(tiny_chat_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    tool = Tool.model_validate(STRICT_WEATHER)
    assert tools_grammar([Tool.model_validate(WEATHER)], "auto", True, None) is None  # not strict: free text
    compiled = _compiled(tokenizer, tools_grammar([tool], "auto", True, None))
    text = compiled.matcher()
    assert _feed(text, tokenizer, "Hello, the capital of France is Paris.") and text.state.is_accepting()
    broken = compiled.matcher()
    assert not _feed(broken, tokenizer, '<tool_call>{"name": "get_weather", "arguments": {"city": "Berlin"')
    for seed in range(12):
        call = compiled.matcher()
        opening = "<tool_call>" if seed % 2 else "\n<tool_call>\n"
        assert _feed(call, tokenizer, opening)
        walked = opening + tokenizer.decode(_walk(call, tokenizer, random.Random(seed)))
        calls = parse_tool_calls(walked, [tool])
        assert calls, walked
        for c in calls:
            assert c.name == "get_weather"
            jsonschema.validate(json.loads(c.arguments), WEATHER["function"]["parameters"])


def test_forced_parallel_calls_follow_each_other_without_blanks(tiny_chat_dir: Path) -> None:
    """Blanks may open the first call, but a further call follows the last one's closing tag
    directly: SmolLM2, allowed blanks there, wrote "\n\n" and the same call again to max_tokens."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    compiled = _compiled(tokenizer, tools_grammar([Tool.model_validate(WEATHER)], "required", True, None))
    call = '<tool_call>{"arguments":{"city":"Paris","days":2},"name":"get_weather"}</tool_call>'
    assert _feed(compiled.matcher(), tokenizer, "\n" + call + call)
    blanks = compiled.matcher()
    assert _feed(blanks, tokenizer, call) and blanks.state.is_accepting()
    assert not _feed(blanks, tokenizer, "\n\n<tool_call>")


def test_a_response_format_beside_tools_allows_the_answer_or_a_call(tiny_chat_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    tool = Tool.model_validate(WEATHER)
    answer = GrammarSpec("json_schema", json.dumps(ANSWER, sort_keys=True))
    compiled = _compiled(tokenizer, tools_grammar([tool], "auto", False, answer))
    assert not _feed(compiled.matcher(), tokenizer, "Hello")  # free text is not the answer's format
    for seed in range(6):
        walked = tokenizer.decode(_walk(compiled.matcher(), tokenizer, random.Random(seed)))
        calls = parse_tool_calls(walked, [tool])
        if calls is None:
            jsonschema.validate(json.loads(walked), ANSWER)
        else:
            assert len(calls) == 1  # parallel_tool_calls false


def test_through_the_api_a_formatted_answer_beside_tools_is_the_answer_or_a_valid_call(
    client: openai.OpenAI, request: pytest.FixtureRequest
) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": ANSWER, "strict": True}}
    r = client.chat.completions.create(
        model=request.getfixturevalue("tools_model"),  # room for the fallback tool prompt
        messages=[{"role": "user", "content": "Hello"}],
        tools=[STRICT_WEATHER],
        response_format=fmt,
        n=4,
        parallel_tool_calls=False,  # one call at most: a random model could chain calls up to max_tokens
        seed=11,
        temperature=1.0,
        max_tokens=120,
    )
    for choice in r.choices:
        if choice.finish_reason == "tool_calls":
            for call in choice.message.tool_calls or []:
                jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
        else:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content or ""), ANSWER)


def test_masks_computed_ahead_of_the_step_leave_every_answer_unchanged(
    loaded_platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same constrained requests, batched, with masks computed during the forward pass (a
    core spare beside torch's threads) and with none spare, choose the same tokens; the first run
    really computed nearly all its masks ahead, the second every mask on the engine thread."""
    computed: Counter[str] = Counter()
    monkeypatch.setattr(grammar_module, "spare_cores", lambda: 1)
    fill = grammar_module.fill_masks

    def counting(matchers: Any) -> None:
        computed[threading.current_thread().name] += sum(1 for m in matchers if m.mask is None)
        fill(matchers)

    monkeypatch.setattr(grammar_module, "fill_masks", counting)
    prompts = ["Hello", "The capital of France", "Write a short poem", "A quick brown fox"]

    async def answers() -> list[str]:
        engine = LocalEngine(loaded_platform.registry, loaded_platform.settings)
        handle = await engine.resolve("tiny-chat")
        spec = GrammarSpec("json_schema", json.dumps(SCHEMAS[2], sort_keys=True))
        compiled = await engine.compile_grammar(handle, spec, param="x")

        async def one(i: int) -> str:
            prompt = await engine.encode_text(handle, prompts[i])
            params = SamplingParams(max_tokens=80, temperature=0.0)  # greedy: batching changes no choice
            request = GenerationRequest(f"r{i}", "tiny-chat", prompt, params, handle=handle, grammar=compiled)
            return "".join([d.text async for d in engine.generate(request)])

        try:
            return list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))
        finally:
            await engine.shutdown()

    ahead = asyncio.run(answers())
    on_engine_thread = sum(n for name, n in computed.items() if not name.startswith("grammar-masks"))
    assert computed["grammar-masks_0"] > 5 * on_engine_thread, computed
    for text in ahead:
        jsonschema.validate(json.loads(text), SCHEMAS[2])
    computed.clear()
    monkeypatch.setattr(grammar_module, "spare_cores", lambda: 0)
    assert asyncio.run(answers()) == ahead
    assert computed["grammar-masks_0"] == 0 and computed


def test_with_no_core_spare_masks_are_computed_when_chosen_on_the_choosing_thread(
    tiny_chat_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where torch's threads take every core, nothing is computed ahead of the step and no mask
    goes through llguidance's pool (a thread that would take a core from torch's); with a core
    spare, the masks are computed ahead."""
    import llguidance.torch
    import torch

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    compiled = _compiled(tokenizer, GrammarSpec("json_schema", json.dumps(SCHEMAS[2], sort_keys=True)))
    matchers = [compiled.matcher() for _ in range(2)]
    monkeypatch.setattr(grammar_module, "spare_cores", lambda: 0)
    prefetch = grammar_module.MaskPrefetch()
    prefetch.start(matchers)
    prefetch.wait()
    assert [m.mask for m in matchers] == [None, None]

    def no_pool(*args: Any) -> None:
        raise AssertionError("a mask went through llguidance's pool")

    with monkeypatch.context() as patched:
        patched.setattr(llguidance.torch, "fill_next_token_bitmask_par", no_pool)
        grammar_module.mask_logits(torch.zeros(2, compiled.vocab_size), [0, 1], matchers)
    on_the_thread = [m.mask for m in matchers]
    assert all(mask is not None for mask in on_the_thread)
    for m in matchers:
        m.mask = None
    monkeypatch.setattr(grammar_module, "spare_cores", lambda: 1)
    prefetch.start(matchers)
    prefetch.wait()
    assert all(
        m.mask is not None and torch.equal(m.mask, mask) for m, mask in zip(matchers, on_the_thread, strict=True)
    )


@pytest.mark.parametrize("spare", [0, 1], ids=["on the calling thread", "in llguidance's pool"])
def test_masks_forbid_exactly_what_the_grammar_forbids_in_place_on_their_rows_only(
    tiny_chat_dir: Path, spare: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``mask_logits`` against llguidance's own per-token answer (``compute_logit_bias``): on the
    constrained rows a token keeps its logit exactly when the grammar allows it, and is -inf
    otherwise (ids past the tokenizer's vocabulary always); the other rows keep every logit; all
    of it in the tensor given (no copy), for logits wider and narrower than the vocabulary; the
    masks computed either where no core is spare or where one is."""
    import torch

    monkeypatch.setattr(grammar_module, "spare_cores", lambda: spare)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    compiled = _compiled(tokenizer, GrammarSpec("json_schema", json.dumps(SCHEMAS[2], sort_keys=True)))
    vocab = compiled.vocab_size
    matchers = [compiled.matcher() for _ in range(3)]
    rng = random.Random(1)
    for matcher, steps in zip(matchers, (0, 4, 9), strict=True):  # the rows stand at different places
        for _ in range(steps):
            allowed = allowed_tokens([matcher], vocab)[0].nonzero().flatten().tolist()
            grammar_module.advance(matcher, rng.choice([t for t in allowed if t != tokenizer.eos_token_id]))
    expected = []
    for m in matchers:
        bias = m.state.deep_copy().compute_logit_bias()
        expected.append(torch.tensor([bias[t] > 0 for t in range(vocab)]))
    rows = [3, 0, 4]
    for width in (vocab + 40, vocab - 7):
        logits = torch.randn(6, width, generator=torch.Generator().manual_seed(width))
        before = logits.clone()
        grammar_module.mask_logits(logits, rows, matchers)
        for row in range(6):
            if row not in rows:
                assert torch.equal(logits[row], before[row])
        for row, allowed in zip(rows, expected, strict=True):
            kept = (
                allowed[:width] if width < vocab else torch.cat([allowed, torch.zeros(width - vocab, dtype=torch.bool)])
            )
            assert torch.equal(logits[row].isfinite(), kept)
            assert torch.equal(logits[row][kept], before[row][kept])
        for m in matchers:
            m.mask = None  # computed again for the next width, from the same states
    everyone = torch.randn(3, vocab)
    grammar_module.mask_logits(everyone, range(3), matchers)  # every row constrained: the direct path
    assert [torch.equal(everyone[i].isfinite(), expected[i]) for i in range(3)] == [True] * 3
