"""Speculative decoding of a single stream (docs/adr/0027): prompt-lookup drafts, the acceptance
rule (exact for greedy rows, the model's distribution for sampled ones, tested statistically),
the runner's output unchanged by it (stop sequences and ``max_tokens`` included), the rule that
decides when it pays, the settings, and the counts in usage and metrics."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError
from scipy.stats import chi2
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

from llmos.api import create_app
from llmos.config import Settings
from llmos.engine import FinishReason, GenerationDelta
from llmos.engine.config import EngineConfig
from llmos.engine.protocol import GenerationRequest, SamplingParams
from llmos.engine.sampling import sampling_probs
from llmos.engine.scheduler import Pending, Row
from llmos.engine.torch_backend import speculative
from llmos.engine.torch_backend.causal import CausalRunner
from llmos.engine.torch_backend.kv_cache import new_cache, truncate
from llmos.engine.torch_backend.lean_decode import LeanDecoder
from llmos.engine.torch_backend.speculative import (
    Speculation,
    accept,
    best_length,
    propose,
    speculates,
    verify_matches_steps,
)
from llmos.monitoring import metrics
from llmos.monitoring.requests import GenerationMetrics
from llmos.platform import Platform
from tests.conftest import ADMIN_KEY
from tests.fake_engine import FakeEngine
from tests.tiny_models import TINY_DECODER
from tests.unit.test_lean_decode import lone_rows_differ_over
from tests.unit.test_scheduler import Sink

PROMPT = [1, 30, 31, 32, 33, 40, 41, 42]


def _model(tiny_chat_dir: Path) -> Any:
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()
    with torch.no_grad():  # the random model's logits are nearly flat: sharpened, each token depends on its context
        model.model.embed_tokens.weight.mul_(8.0)  # (tied to the output layer)
    return model


# -- drafting ---------------------------------------------------------------------------------
def test_a_draft_is_what_followed_the_latest_occurrence_of_the_longest_suffix() -> None:
    tokens = torch.tensor([5, 6, 7, 8, 9, 1, 2, 3, 5, 6, 7, 4, 0, 9, 5, 6, 7])
    assert propose(tokens, 3) == [4, 0, 9]  # [5, 6, 7] last seen at 8 (not at 0), what followed it
    assert propose(tokens, 10) == [4, 0, 9, 5, 6, 7]  # no more than the sequence holds
    # The longest match wins over a more recent shorter one: [2, 3] occurs once, [3] later too.
    assert propose(torch.tensor([1, 2, 3, 8, 3, 9, 2, 3]), 2, shortest=1) == [8, 3]
    assert propose(torch.tensor([1, 3, 8, 9, 2, 3]), 2, shortest=1) == [8, 9]
    assert propose(torch.tensor([1, 3, 8, 9, 2, 3]), 2) == []  # by default a single token is no match
    assert propose(torch.tensor([1, 2, 3, 4]), 4) == []  # the last token never occurred before
    assert propose(torch.tensor([7]), 4) == []


# -- the acceptance rule -------------------------------------------------------------------------
def test_greedy_rows_accept_the_draft_while_it_is_the_argmax() -> None:
    logits = torch.full((4, 10), -5.0)
    for row, best in enumerate([3, 4, 9, 2]):
        logits[row, best] = 5.0
    assert accept(logits, [3, 4, 5], 0.0, 1.0, None) == (2, 9)  # the third is not the argmax: 9 replaces it
    assert accept(logits, [3, 4, 9], 0.0, 1.0, None) == (3, 2)  # all accepted, and the token after them
    assert accept(logits, [1, 4, 9], 0.0, 1.0, None) == (0, 3)


def _chi_square_p(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """The chi-square goodness-of-fit p-value of ``samples`` (token ids) against ``probs``, cells
    expected fewer than 5 times pooled into one."""
    counts = torch.bincount(samples, minlength=probs.shape[0]).double()
    expected = probs.double() * len(samples)
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    wanted = torch.cat([expected[big], expected[~big].sum()[None]])
    if wanted[-1] < 5:  # the pooled rest is too small a cell of its own: folded into the smallest one
        observed, wanted = observed[:-1], wanted[:-1]
        observed[wanted.argmin()] += counts[~big].sum()
        wanted[wanted.argmin()] += expected[~big].sum()
    statistic = float(((observed - wanted) ** 2 / wanted).sum())
    return float(chi2.sf(statistic, len(wanted) - 1))


def _broken_accept(logits: torch.Tensor, draft: list[int], t: float, top_p: float, g: Any) -> tuple[int, int]:
    """The rule with one mistake: a rejected draft token is replaced by a draw from ``p`` itself
    (the draft token not removed), which favours the draft."""
    probs = sampling_probs(logits, torch.full((len(logits),), t), torch.full((len(logits),), top_p))
    for i, token in enumerate(draft):
        if float(torch.rand((), generator=g)) >= float(probs[i, token]):
            return i, int(torch.multinomial(probs[i], 1, generator=g)[0])
    return len(draft), int(torch.multinomial(probs[-1], 1, generator=g)[0])


def test_sampled_rows_keep_the_models_distribution(tiny_chat_dir: Path) -> None:
    """Thousands of seeded verifies of a two-token draft on the tiny model: the first token and the
    second (given the first was the draft's) follow the distributions a plain decode step samples
    from (temperature and top-p applied), by a chi-square test that the broken rule fails."""
    model = _model(tiny_chat_dir)
    decoder = LeanDecoder.build(model, int8=False, native=False)
    assert decoder is not None
    cache = new_cache(model.config)
    first = decoder.prefill([(PROMPT, 0, cache)])
    token = int(first.argmax())
    temperature, top_p = 1.0, 0.95

    def process(row: torch.Tensor) -> torch.Tensor:
        return sampling_probs(row[None], torch.tensor([temperature]), torch.tensor([top_p]))[0]

    # The draft: the most likely token, then the most likely after it (each about an even chance;
    # the other tokens share the rest).
    position = len(PROMPT)
    step = torch.ones((1, position + 1), dtype=torch.long)
    head = decoder(torch.tensor([token]), torch.tensor([position]), step, cache, None)[0]  # a plain decode step
    draft = [int(head.argmax())]
    truncate(cache, position)
    logits = decoder.prefill([([token, *draft], position, cache)], every=[True])
    draft.append(int(logits[1].argmax()))
    truncate(cache, position)
    logits = decoder.prefill([([token, *draft], position, cache)], every=[True])
    # The verify's rows are the plain decode steps' logits.
    torch.testing.assert_close(logits[0], head, rtol=1e-5, atol=1e-5)
    exact = [process(logits[0]), process(logits[1])]
    assert 0.05 < float(exact[0][draft[0]]) < 0.7 and 0.05 < float(exact[1][draft[1]]) < 0.95

    def run(rule: Any) -> tuple[float, float]:
        generator = torch.Generator().manual_seed(1234)
        firsts, seconds = [], []
        for _ in range(6000):
            taken, after = rule(logits, draft, temperature, top_p, generator)
            firsts.append(draft[0] if taken else after)
            if taken:
                seconds.append(draft[1] if taken == 2 else after)
        return _chi_square_p(torch.tensor(firsts), exact[0]), _chi_square_p(torch.tensor(seconds), exact[1])

    assert min(run(accept)) > 1e-3
    assert max(run(_broken_accept)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cached", [20, 124, 150])  # steps through SDPA, across its limit (128), grouped
def test_a_verify_gives_each_position_a_decode_steps_logits_bit_for_bit(cached: int, dtype: torch.dtype) -> None:
    """Each row of a verify is what a decode step of one row computes at that position, bit for bit
    (a packed prefill's rows round differently in bf16, and greedy verifies then flipped near ties:
    served bf16 answers differed from plain decoding's, ADR 0027); in float32 too, where BLAS's
    product of a head group's 3 query rows and of 27 differ in their last bits, so that one call for
    all positions would not do. The model is wider than the tiny one: oneDNN's bf16 product over 32
    inputs is not the same for 1 row and 9."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=400, **{**TINY_DECODER, "hidden_size": 64, "intermediate_size": 128})
    model = LlamaForCausalLM(config).eval().to(dtype)
    decoder = LeanDecoder.build(model, int8=False, native=False)
    assert decoder is not None
    tokens = torch.randint(3, model.config.vocab_size, (cached + 9,), generator=torch.Generator().manual_seed(cached))
    ids = tokens.tolist()
    cache = new_cache(model.config)
    decoder.prefill([(ids[:cached], 0, cache)])
    steps = []
    for position in range(cached, cached + 9):
        attention = torch.ones((1, position + 1), dtype=torch.long)
        steps.append(decoder(tokens[position : position + 1], torch.tensor([position]), attention, cache, None)[0])
    truncate(cache, cached)
    verified = decoder.verify(ids[cached:], cached, cache)
    assert [torch.equal(row, step) for row, step in zip(verified, steps, strict=True)] == [True] * 9
    assert cache.layers[0].keys.shape[2] == cached + 9  # the cache extended as the steps extended it


# -- the runner ---------------------------------------------------------------------------------
def _biased_llama(tiny_chat_dir: Path) -> Any:
    """A tiny random Llama with biases on every attention projection, o_proj's too (no lean
    layers), on the tiny chat model's tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **TINY_DECODER,
        max_position_embeddings=256,
        attention_bias=True,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8.0)
    return model


@pytest.fixture(params=["llama", "biased-llama"])
def build(request: pytest.FixtureRequest, tiny_chat_dir: Path) -> Iterator[Any]:
    """Runners of one tiny model: Llama (verified by the lean layers) or a Llama with attention
    biases (by its forward)."""
    made: list[CausalRunner] = []
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)

    def runner(mode: str, **options: Any) -> CausalRunner:
        # A new model a runner: a runner adapts it.
        model = _model(tiny_chat_dir) if request.param == "llama" else _biased_llama(tiny_chat_dir)
        config = EngineConfig(**{"threads": 1, "speculative_decoding": mode, **options})
        made.append(CausalRunner(model, tokenizer, context_length=256, config=config))
        assert (made[-1].decoder is not None) == (request.param == "llama")
        return made[-1]

    yield runner
    for r in made:
        r.close()


REQUEST_IDS = itertools.count()


def generate(runner: CausalRunner, prompt: list[int], prediction: list[int] | None = None, **params: Any) -> Sink:
    params = {"temperature": 0.0, **params}
    request = GenerationRequest(
        f"r{next(REQUEST_IDS)}", "tiny", prompt, SamplingParams(**params), prediction_token_ids=prediction or ()
    )
    sink = Sink(request.params.n)
    runner.submit(request, sink)
    return sink.wait()


def settled(runner: CausalRunner) -> CausalRunner:
    """``runner`` once its engine thread has counted the step that streamed the last token."""
    for _ in range(500):
        if not runner.busy:
            return runner
        time.sleep(0.01)
    raise AssertionError("the runner never went idle")


def test_greedy_output_is_unchanged_by_speculation(build: Any) -> None:
    """On a prompt whose answer copies an earlier passage, drafts are accepted, and the output
    (tokens, text, finish) is the one-token-at-a-time output, to ``max_tokens`` or a stop
    sequence, nothing streamed past either; the counts reach the deltas."""
    plain, spec = build("off"), build("ngram")
    # An earlier passage after the prompt's tokens: drafts from it that the model rejects, beside
    # the ones from its own output that it accepts.
    passage = [42, 42, 7, 8, 9, 10] + [(37 * i) % 300 + 20 for i in range(40)] + [42, 42, 42]
    copying = PROMPT + passage + PROMPT
    counted = settled(plain).stats()["tokens_generated"]
    want = generate(plain, copying, max_tokens=40)
    got = generate(spec, copying, max_tokens=40)
    assert (got.tokens, got.finish) == (want.tokens, want.finish)
    assert "".join(d.text for d in got.deltas) == "".join(d.text for d in want.deltas)
    stats = settled(spec).stats()
    assert stats["spec_verifies"] > 0 and stats["spec_accepted_tokens"] > 0
    accepted = sum(d.accepted_draft_tokens for d in got.deltas)
    assert 0 < accepted <= sum(d.draft_tokens for d in got.deltas)
    assert stats["tokens_generated"] == settled(plain).stats()["tokens_generated"] - counted  # each counted once

    for limit in (7, 13):  # max_tokens falling inside a verified draft
        want = generate(plain, copying, max_tokens=limit)
        got = generate(spec, copying, max_tokens=limit)
        assert got.tokens == want.tokens and len(got.tokens) <= limit and got.finish == want.finish
    text = "".join(d.text for d in want.deltas)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    want = generate(plain, copying, max_tokens=40, stop=(stop,))
    got = generate(spec, copying, max_tokens=40, stop=(stop,))
    assert want.finish == FinishReason.STOP
    assert (got.tokens, got.finish) == (want.tokens, want.finish)
    assert "".join(d.text for d in got.deltas) == "".join(d.text for d in want.deltas)


def test_a_prediction_is_drafted_from_and_leaves_the_output_unchanged(build: Any) -> None:
    plain, spec = build("off"), build("ngram")
    want = generate(plain, PROMPT, max_tokens=30, ignore_eos=True)
    for prediction in (want.tokens, [7, 8, 9, 10] * 5):  # right, and wrong
        assert generate(spec, PROMPT, prediction, max_tokens=30, ignore_eos=True).tokens == want.tokens
    # What drafts come from: the prompt, then the prediction, then the output so far.
    request = GenerationRequest("p", "tiny", [1, 2, 3], SamplingParams(), prediction_token_ids=[20, 21, 22, 23, 24])
    row = Row(Pending(request, lambda d: None, 99), 0, None)  # type: ignore[arg-type]
    row.output_ids = [9, 20, 21]
    speculation = Speculation("ngram", 3, verify=None, streamer=None)  # type: ignore[arg-type]
    assert propose(speculation._track(row).sync(row), 3) == [22, 23, 24]
    row.output_ids += [22, 7]
    assert propose(speculation._track(row).sync(row), 3) == []  # the answer left the prediction


def test_rows_the_rule_cannot_serve_decode_one_token_at_a_time(build: Any) -> None:
    spec = build("ngram")
    passage = generate(spec, PROMPT, max_tokens=30, ignore_eos=True).tokens
    verifies = settled(spec).stats()["spec_verifies"]
    for params in (
        {"temperature": 1.0, "seed": 7},
        {"presence_penalty": 0.5},
        {"frequency_penalty": 0.5},
        {"logprobs": True},
    ):
        generate(spec, PROMPT + passage + PROMPT, max_tokens=20, **params)
    assert settled(spec).stats()["spec_verifies"] == verifies
    # Unseeded, it speculates: at a low temperature its draws follow the greedy passage, which
    # prompt lookup finds drafts in (at temperature 1 the tiny model's draws may leave it at once).
    torch.manual_seed(0)
    generate(spec, PROMPT + passage + PROMPT, max_tokens=20, temperature=0.05)
    assert settled(spec).stats()["spec_verifies"] > verifies


def test_speculates_only_rows_whose_decoding_it_reproduces() -> None:
    def row(**params: Any) -> Row:
        request = GenerationRequest("r", "tiny", [1], SamplingParams(**params))
        return Row(Pending(request, lambda d: None, 10), 0, None)  # type: ignore[arg-type]

    assert speculates(row(temperature=0.0)) and speculates(row(temperature=0.0, seed=3))
    assert speculates(row(temperature=0.7, top_p=0.9))
    assert not speculates(row(temperature=0.7, seed=3))
    assert not speculates(row(temperature=0.0, presence_penalty=0.1))
    assert not speculates(row(temperature=0.0, logprobs=True))
    request = GenerationRequest("r", "tiny", [1], SamplingParams(temperature=0.0))
    assert not speculates(Row(Pending(request, lambda d: None, 10, adapter="ad"), 0, None))  # type: ignore[arg-type]


def test_auto_asks_the_cpu_whether_a_verify_reproduces_the_decode_step(
    tiny_chat_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``auto`` probes the lean layers at load: where a verify's logits differ from the decode
    steps' in any bit (as bf16 and float32 did on one AVX-512 CPU), it does not speculate and says
    why, the backend no longer counts the model as speculating, and ``ngram`` speculates anyway.
    The tiny model's verify matches, so it speculates."""
    model = _model(tiny_chat_dir)
    decoder = LeanDecoder.build(model, int8=False, native=False)
    assert decoder is not None
    config = EngineConfig(speculative_decoding="auto")
    monkeypatch.setattr(speculative, "_probed", {})
    assert verify_matches_steps(model, decoder, 9)
    assert Speculation.build(config, model, decoder, None, "past_key_values") is not None  # type: ignore[arg-type]
    assert not speculative.verify_failed(tiny_chat_dir)
    verify = decoder.verify

    def off_by_a_bit(*args: Any, **kwargs: Any) -> torch.Tensor:
        logits = verify(*args, **kwargs)
        logits[-1, 0] = torch.nextafter(logits[-1, 0], torch.tensor(torch.inf, dtype=logits.dtype))
        return logits

    monkeypatch.setattr(decoder, "verify", off_by_a_bit)
    monkeypatch.setattr(speculative, "_probed", {})  # a model loaded anew
    with caplog.at_level("WARNING"):
        assert Speculation.build(config, model, decoder, None, "past_key_values") is None  # type: ignore[arg-type]
    assert "does not give each position a decode step's logits bit for bit" in caplog.text
    assert speculative.verify_failed(tiny_chat_dir)
    ngram = EngineConfig(speculative_decoding="ngram")
    assert Speculation.build(ngram, model, decoder, None, "past_key_values") is not None  # type: ignore[arg-type]


def test_a_runner_pads_the_products_whose_lone_rows_differ_and_still_speculates_exactly(
    tiny_chat_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CPU whose lone-row down product (64 inputs here, 1,536 on the AVX-512 EPYC) comes out a
    float step off: the runner pads it at load, so ``auto`` still speculates, and its greedy answer
    is the one ``off`` gives."""
    lone_rows_differ_over(64, monkeypatch)
    monkeypatch.setattr(speculative, "_probed", {})
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    runners = {
        mode: CausalRunner(
            _model(tiny_chat_dir),
            tokenizer,
            context_length=256,
            config=EngineConfig(threads=1, speculative_decoding=mode),
        )
        for mode in ("auto", "off")
    }
    try:
        assert runners["auto"].speculation is not None
        assert runners["auto"].decoder is not None and runners["auto"].decoder.padded_shapes == {(32, 64)}
        copying = PROMPT + [(37 * i) % 300 + 20 for i in range(40)] + PROMPT
        got, want = (generate(runners[mode], copying, max_tokens=40) for mode in ("auto", "off"))
        assert got.tokens == want.tokens
        assert sum(d.accepted_draft_tokens for d in got.deltas) > 0
    finally:
        for runner in runners.values():
            runner.close()


def test_auto_speculates_only_where_the_verify_reproduces_the_decode_step(
    tiny_chat_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``auto`` (the default) needs the lean layers, whose verify is the decode step bit for bit; a
    model verified through its own forward (equal only up to rounding) speculates under ``ngram``
    alone, and the backend says so before loading it, as a chat request's ``prediction`` needs."""
    from llmos.engine.torch_backend.backend import TorchBackend

    model = _biased_llama(tiny_chat_dir)
    for mode, built in (("auto", False), ("ngram", True), ("off", False)):
        config = EngineConfig(speculative_decoding=mode)
        assert (Speculation.build(config, model, None, None, "past_key_values") is not None) == built  # type: ignore[arg-type]
    biased = tmp_path / "biased"
    model.config.save_pretrained(biased)

    class Registry:
        def model_dir(self, record: Any) -> Path:
            return tiny_chat_dir if record.id == "plain" else biased

    def speculates(mode: str, model_id: str, **options: Any) -> bool:
        backend = TorchBackend(Registry(), EngineConfig(speculative_decoding=mode, **options), torch.float32)  # type: ignore[arg-type]
        return backend.speculates(SimpleNamespace(id=model_id, task="chat"))  # type: ignore[arg-type]

    assert speculates("auto", "plain") and speculates("ngram", "plain") and speculates("ngram", "biased")
    assert not speculates("auto", "biased") and not speculates("off", "plain")
    # A probe at the plain model's load found its verify differs on this CPU: auto no longer counts it.
    monkeypatch.setattr(speculative, "_probed", {(str(tiny_chat_dir), "torch.float32", 2, 9): False})
    assert not speculates("auto", "plain") and speculates("ngram", "plain")


# -- when it pays ----------------------------------------------------------------------------------
def test_a_row_drafts_while_its_acceptance_pays_for_the_verify() -> None:
    assert best_length(0.0, 8) == 0  # nothing accepted: a verify yields one token for more than a step
    assert best_length(0.9, 8) == 8  # nearly everything accepted: the longest draft
    assert best_length(0.9, 3) == 3
    spec = Speculation("auto", 8, verify=None, streamer=None)  # type: ignore[arg-type]
    request = GenerationRequest("r", "m", [1, 2], SamplingParams())
    tracked = spec._track(Row(Pending(request, lambda d: None, 9), 0, None))  # type: ignore[arg-type]
    assert spec._length(tracked.lookup, 8) > 0  # a new row tries
    for _ in range(20):
        spec._record(tracked.lookup, 0, 8)  # rejected at once, again and again

    def refused_before_a_probe() -> int:
        steps = 0
        while spec._length(tracked.lookup, 8) == 0:
            steps += 1
        return steps

    # Refused, it waits and probes once, each wait twice the last while probes keep failing.
    assert [refused_before_a_probe() for _ in range(3)] == [2, 4, 8]
    spec._record(tracked.lookup, 5, 8)
    spec._record(tracked.lookup, 8, 8)  # copying again: it drafts at once
    assert spec._length(tracked.lookup, 8) > 0
    assert Speculation("ngram", 8, None, None)._length(tracked.lookup, 5) == 5  # type: ignore[arg-type]


# -- settings ----------------------------------------------------------------------------------------
def test_bad_speculation_settings_are_refused_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="speculative_decoding"):
        Settings(home=tmp_path, speculative_decoding="eagle")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="speculative_tokens"):
        Settings(home=tmp_path, speculative_tokens=0)
    with pytest.raises(ValidationError, match="needs the torch backend"):
        Settings(home=tmp_path, speculative_decoding="ngram", gguf_backend="llama.cpp")
    for mode in ("auto", "ngram"):
        assert Settings(home=tmp_path, speculative_decoding=mode).speculative_decoding == mode  # type: ignore[arg-type]
    assert Settings(home=tmp_path).speculative_decoding == "auto"


# -- counts in usage and metrics ---------------------------------------------------------------------
DRAFTED = (
    GenerationDelta(index=0, text="a", token_ids=(5,), draft_tokens=8, accepted_draft_tokens=1),
    GenerationDelta(index=0, text="b", token_ids=(6,), accepted_draft_tokens=1),
    GenerationDelta(index=0, text="c", token_ids=(7,), draft_tokens=4, accepted_draft_tokens=3),
    GenerationDelta(index=0, text="", finish_reason=FinishReason.STOP),
)
DETAILS = {"accepted_prediction_tokens": 5, "rejected_prediction_tokens": 7, "reasoning_tokens": 0, "audio_tokens": 0}


@pytest.fixture
def drafted_http(loaded_platform: Platform) -> Iterator[TestClient]:
    with TestClient(create_app(platform=loaded_platform, engine=FakeEngine(deltas=DRAFTED))) as client:
        yield client


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"prompt": "hi"}),
    ],
)
def test_usage_reports_accepted_and_rejected_drafts(drafted_http: TestClient, path: str, body: dict[str, Any]) -> None:
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    body = {"model": "tiny-chat", **body}
    whole = drafted_http.post(path, headers=auth, json=body).json()
    assert whole["usage"]["completion_tokens"] == 3
    assert whole["usage"]["completion_tokens_details"] == DETAILS
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with drafted_http.stream("POST", path, headers=auth, json=streamed) as resp:
        lines = [line for line in resp.iter_lines() if line.startswith("data: {")]
    assert '"accepted_prediction_tokens":5' in lines[-1] and '"rejected_prediction_tokens":7' in lines[-1]


CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 12, "temperature": 0}


@pytest.fixture
def speculating_http(loaded_platform: Platform) -> Iterator[TestClient]:
    """The app with ``speculative_decoding = "ngram"`` (drafting wherever a draft is found, not only where it pays)."""
    settings = loaded_platform.settings.model_copy(update={"speculative_decoding": "ngram"})
    with TestClient(create_app(platform=dataclasses.replace(loaded_platform, settings=settings))) as client:
        yield client


def test_a_prediction_leaves_the_answer_unchanged(speculating_http: TestClient) -> None:
    http = speculating_http
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    plain = http.post("/v1/chat/completions", headers=auth, json=CHAT).json()
    answer = plain["choices"][0]["message"]["content"]
    for content in (answer, [{"type": "text", "text": answer}], "something else entirely"):
        body = {**CHAT, "prediction": {"type": "content", "content": content}}
        resp = http.post("/v1/chat/completions", headers=auth, json=body)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] == answer
        assert set(resp.json()["usage"]["completion_tokens_details"]) == set(DETAILS)


@pytest.mark.parametrize(
    "extra",
    [
        {"n": 2},
        {"logprobs": True},
        {"presence_penalty": 0.5},
        {"frequency_penalty": 0.5},
        {"temperature": 0.7, "seed": 3},
        {"response_format": {"type": "json_object"}},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
        {"prediction": {"type": "content", "content": "x " * 400}},  # longer than the tiny model's context
        {"prediction": {"type": "text", "content": "x"}},
    ],
)
def test_a_prediction_that_cannot_be_used_is_refused(speculating_http: TestClient, extra: dict[str, Any]) -> None:
    body = {**CHAT, "prediction": {"type": "content", "content": "Hello"}, **extra}
    resp = speculating_http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"].startswith("prediction")


def test_a_prediction_is_refused_when_speculation_is_off(loaded_platform: Platform) -> None:
    settings = loaded_platform.settings.model_copy(update={"speculative_decoding": "off"})
    with TestClient(create_app(platform=dataclasses.replace(loaded_platform, settings=settings))) as http:
        body = {**CHAT, "prediction": {"type": "content", "content": "Hello"}}
        resp = http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, json=body)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prediction"
    assert "speculative_decoding" in resp.json()["error"]["message"]


def test_draft_counts_reach_the_metrics() -> None:
    names = ("llmos_spec_decode_draft_tokens_total", "llmos_spec_decode_accepted_tokens_total")

    def values() -> list[float]:
        labels = {"model_name": metrics.UNKNOWN_MODEL}  # the request below never resolved a model
        return [metrics.REGISTRY.get_sample_value(name, labels) or 0.0 for name in names]

    before = values()
    observed = GenerationMetrics(GenerationRequest("m", "spec-model", [1], SamplingParams()))
    for delta in DRAFTED:
        observed.observe(delta)
    observed.close()
    assert [a - b for a, b in zip(values(), before, strict=True)] == [12, 5]
