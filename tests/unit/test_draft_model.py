"""Speculative decoding with a draft model (``draft_models``, docs/adr/0027): its proposals are its
own greedy continuation however its cache was left, the target's output is unchanged by them
(accepted and rejected), ``auto`` counts a draft token's cost, and pairings that cannot work are
refused when the engine starts or the model loads, with the setting named."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from llmos.config import Settings
from llmos.engine.backends import LOAD_OVERHEAD_BYTES
from llmos.engine.config import EngineConfig
from llmos.engine.local import LocalEngine
from llmos.engine.sampling import sampling_probs
from llmos.engine.torch_backend import speculative
from llmos.engine.torch_backend.causal import CausalRunner
from llmos.engine.torch_backend.draft_model import CATCH_UP_TOKENS, DraftModel, _Chooser
from llmos.engine.torch_backend.kv_cache import new_cache
from llmos.engine.torch_backend.lean_decode import LeanDecoder
from llmos.engine.torch_backend.speculative import accept, best_length
from llmos.errors import ModelLoadError
from llmos.platform import Platform
from llmos.registry.adapters import kv_width
from tests.unit.test_speculative import PROMPT, _biased_llama, _chi_square_p, generate, settled


def _greedy(model: Any, tokens: list[int], count: int) -> list[int]:
    """``count`` greedy tokens after ``tokens``, one plain decode step at a time, from scratch."""
    decoder = LeanDecoder.build(model, int8=False, native=False)
    assert decoder is not None
    cache = new_cache(model.config)
    out = [int(decoder.prefill([(tokens, 0, cache)])[-1].argmax())]
    for position in range(len(tokens), len(tokens) + count - 1):
        attention = torch.ones((1, position + 1), dtype=torch.long)
        out.append(int(decoder(torch.tensor([out[-1]]), torch.tensor([position]), attention, cache, None)[0].argmax()))
    return out


def _untied(tiny_chat_dir: Path, root: Path, seed: int) -> Path:
    """A tiny random Llama on the tiny chat model's tokenizer with an output layer of its own: the
    tied tiny model's greedy answer repeats its last token, which any draft guesses."""
    config = AutoConfig.from_pretrained(tiny_chat_dir)
    config.tie_word_embeddings = False
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # sharper: each token depends on its context
    model.save_pretrained(root)
    AutoTokenizer.from_pretrained(tiny_chat_dir).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def target_dir(tiny_chat_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _untied(tiny_chat_dir, tmp_path_factory.mktemp("target"), seed=0)


@pytest.fixture(scope="module")
def other_dir(tiny_chat_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another model on the same tokenizer (other weights): a draft the target mostly rejects."""
    return _untied(tiny_chat_dir, tmp_path_factory.mktemp("draft"), seed=1)


def _load(directory: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def test_a_proposal_is_the_draft_models_greedy_continuation_whatever_its_cache_held(target_dir: Path) -> None:
    """Rolled back to what the new tokens share with what it read (a rejected draft, another
    request), or started again: always what it would propose from scratch."""
    model = _load(target_dir)
    draft = DraftModel(model, name="d", target=model, positions=256)
    assert draft.cost == pytest.approx(1.0)  # itself: as dear as a target step

    def proposed(tokens: list[int], count: int) -> list[int]:
        out, drawn_from = draft.propose(tokens, count)
        assert drawn_from is None  # greedy: no distribution to divide by
        # Its cache holds what it read: the tokens and every draft token but the last.
        assert len(draft._read) == draft._cache.get_seq_length() == len(tokens) + count - 1
        return out

    first = proposed(PROMPT, 4)
    assert first == _greedy(model, PROMPT, 4)
    assert proposed(PROMPT, 1) == first[:1]
    # A request arriving (asked before each further token) ends the draft: what was drafted so far.
    arrivals = iter([False, True])
    assert draft.propose(PROMPT, 4, arrived=lambda: next(arrivals)) == (first[:2], None)
    assert len(draft._read) == draft._cache.get_seq_length() == len(PROMPT) + 1
    for tokens in (
        PROMPT + first[:2] + [7],  # two drafts accepted, then another token
        [*PROMPT, 99, 98, 97],  # the whole draft rejected
        [*PROMPT[:3], 50, 51],  # an earlier divergence (another request after a shared start)
        [60, 61, 62, 63],  # nothing in common
        [60, 61, 62, 63],  # exactly what it read: the last token read again
    ):
        assert proposed(tokens, 3) == _greedy(model, tokens, 3), tokens
    # A long new prompt is read CATCH_UP_TOKENS a call, nothing proposed until it is all read.
    long = [(7 * i) % 300 + 5 for i in range(CATCH_UP_TOKENS * 2 + 10)]
    assert draft.propose(long, 3) == ([], None) and draft.propose(long, 3) == ([], None)
    assert proposed(long, 3) == _greedy(model, long, 3)
    assert draft.fits(250, 6) and not draft.fits(252, 6)  # its context: 256 positions
    # Sampled: each token drawn from the distribution returned for it, the row's temperature and
    # top-p applied to the draft model's logits after the tokens before it.
    tokens, drawn_from = draft.propose(PROMPT, 3, 0.8, 0.9, torch.Generator().manual_seed(0))
    assert drawn_from is not None and drawn_from.shape == (3, model.config.vocab_size)
    decoder = LeanDecoder.build(model, int8=False, native=False)
    assert decoder is not None
    logits = decoder.prefill([([*PROMPT, *tokens[:2]], 0, new_cache(model.config))], every=[True])[-3:]
    want = sampling_probs(logits, torch.full((3,), 0.8), torch.full((3,), 0.9))
    torch.testing.assert_close(drawn_from, want, rtol=1e-4, atol=1e-6)
    assert all(float(drawn_from[i, token]) > 0 for i, token in enumerate(tokens))
    # Drawn, not chosen: at a low temperature (a few likely tokens) the first draft token's
    # frequencies over many calls fit its distribution.
    generator = torch.Generator().manual_seed(1)
    firsts = [draft.propose(PROMPT, 1, 0.1, 1.0, generator)[0][0] for _ in range(300)]
    first = sampling_probs(logits[:1], torch.tensor([0.1]), torch.tensor([1.0]))[0]
    assert float(first.max()) < 0.9 and _chi_square_p(torch.tensor(firsts), first) > 1e-3, first.topk(4)


@pytest.fixture
def runners(target_dir: Path) -> Iterator[Any]:
    made: list[CausalRunner] = []
    tokenizer = AutoTokenizer.from_pretrained(target_dir)

    def runner(mode: str, draft_dir: Path | None) -> CausalRunner:
        target = _load(target_dir)
        draft = None
        if draft_dir is not None:
            draft = DraftModel(_load(draft_dir), name="draft", target=target, positions=256)
        config = EngineConfig(threads=1, speculative_decoding=mode)
        made.append(CausalRunner(target, tokenizer, context_length=256, config=config, draft=draft))
        return made[-1]

    yield runner
    for r in made:
        r.close()


@pytest.mark.parametrize("which", ["same weights", "other weights"])
def test_greedy_output_is_unchanged_by_a_draft_model(
    runners: Any, target_dir: Path, other_dir: Path, which: str
) -> None:
    """A prompt with nothing to copy: the draft model drafts. A draft of the target's own weights
    is accepted throughout, another model's mostly rejected; the output is the plain one either
    way, to ``max_tokens`` and a stop sequence."""
    plain = runners("off", None)
    spec = runners("ngram", target_dir if which == "same weights" else other_dir)
    for limit in (30, 11):
        want = generate(plain, PROMPT, max_tokens=limit, ignore_eos=True)
        got = generate(spec, PROMPT, max_tokens=limit, ignore_eos=True)
        assert (got.tokens, got.finish) == (want.tokens, want.finish)
    text = "".join(d.text for d in want.deltas)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    want = generate(plain, PROMPT, max_tokens=30, stop=(stop,))
    assert generate(spec, PROMPT, max_tokens=30, stop=(stop,)).tokens == want.tokens
    stats = settled(spec).stats()
    assert stats["spec_model_draft_tokens"] > 0 and stats["spec_verifies"] > 0
    # The draft model stops drafting when a request waits for the engine.
    assert spec.speculation.arrived == spec._arrived and not spec._arrived()
    rejected = stats["spec_draft_tokens"] - stats["spec_accepted_tokens"]
    assert rejected == 0 if which == "same weights" else rejected > 0
    # A sampled row keeps drafting with the model and finishes.
    assert len(generate(spec, PROMPT, max_tokens=20, temperature=1.0, ignore_eos=True).tokens) == 20


def test_a_draft_is_drawn_over_the_targets_vocabulary() -> None:
    """A draft model's output layer narrower than the target's: the ids it lacks are never drawn
    and have no probability in ``q``; a wider one: its extra ids (padding) are left out."""
    for width in (5, 10):
        choose = _Chooser(8, 1.0, 1.0, torch.Generator().manual_seed(0))
        drawn = {choose(torch.zeros(width)) for _ in range(200)}
        assert drawn == set(range(min(width, 8)))
        assert all(q.shape == (8,) and float(q[min(width, 8) :].sum()) == 0 for q in choose.drawn_from)
        assert choose.drawn_from[0].sum() == pytest.approx(1.0)


def test_sampled_drafts_are_divided_by_the_distribution_they_were_drawn_from(
    runners: Any, target_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sampled row's drafts are drawn from the draft model's own distribution and accepted with
    probability min(1, p/q): a draft model of the target's own weights (q = p) is accepted every
    time, where a point-mass rule would accept each token with only its probability p."""
    monkeypatch.setattr(speculative, "propose", lambda *args, **kwargs: [])  # the draft model's drafts only
    torch.manual_seed(0)  # an unseeded row draws from torch's global generator
    spec = runners("ngram", target_dir)
    assert len(generate(spec, PROMPT, max_tokens=40, temperature=1.0, ignore_eos=True).tokens) == 40
    stats = settled(spec).stats()
    assert stats["spec_model_draft_tokens"] == stats["spec_draft_tokens"] == stats["spec_accepted_tokens"] > 20


def _undivided_rest(logits: torch.Tensor, draft: list[int], t: float, top_p: float, g: Any, q: Any) -> tuple[int, int]:
    """The rule with one mistake: accepted with probability min(1, p/q), but a rejected token
    replaced by a draw from ``p`` without it (the point-mass rule's rest), not from max(0, p - q)."""
    probs = sampling_probs(logits, torch.full((len(logits),), t), torch.full((len(logits),), top_p))
    for i, token in enumerate(draft):
        if float(torch.rand((), generator=g)) * float(q[i, token]) >= float(probs[i, token]):
            rest = probs[i].clone()
            rest[token] = 0.0
            return i, int(torch.multinomial(rest, 1, generator=g)[0])
    return len(draft), int(torch.multinomial(probs[-1], 1, generator=g)[0])


def test_sampled_drafts_keep_the_targets_distribution_and_are_accepted_more() -> None:
    """Thousands of seeded verifies of two-token drafts drawn from another distribution ``q``
    (one that puts mass where the target's top-p leaves none): the first token, and the second
    given the first was the draft's, follow the target's distribution ``p`` by a chi-square test,
    which a wrong rest fails. Dividing by ``q`` accepts more of the drafts than taking each as a
    point mass (also exact, as any fixed draft is), as expected: sum min(p, q) against sum p q."""
    temperature, top_p = 0.8, 0.9
    target = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0], [-1.0, 0.0, 1.5, 1.5, 0.0, -2.0], [0.0] * 6])
    drafted = torch.tensor([[0.0, 1.5, 2.0, 0.5, -1.0, 1.0], [1.0, 0.0, 0.5, 2.0, -1.0, 0.5]])
    p = sampling_probs(target, torch.full((3,), temperature), torch.full((3,), top_p))
    q = sampling_probs(drafted, torch.full((2,), temperature), torch.full((2,), top_p))
    assert float(p[0, 5]) == 0 < float(q[0, 5])  # q drafts a token p never samples

    def run(rule: Any, q_given: Any) -> tuple[float, float, float]:
        generator = torch.Generator().manual_seed(1234)
        firsts, seconds = [], []
        for _ in range(6000):
            draft = [int(torch.multinomial(q[i], 1, generator=generator)[0]) for i in range(2)]
            taken, after = rule(target, draft, temperature, top_p, generator, q_given)
            firsts.append(draft[0] if taken else after)
            if taken:
                seconds.append(draft[1] if taken == 2 else after)
        fit = _chi_square_p(torch.tensor(firsts), p[0]), _chi_square_p(torch.tensor(seconds), p[1])
        return *fit, len(seconds) / 6000  # the first draft token's acceptance

    *fit, divided = run(accept, q)
    assert min(fit) > 1e-3
    assert divided == pytest.approx(float(torch.minimum(p[0], q[0]).sum()), abs=0.02)
    *fit, point_mass = run(accept, None)
    assert min(fit) > 1e-3
    assert point_mass == pytest.approx(float((p[0] * q[0]).sum()), abs=0.02) and point_mass < divided - 0.1
    assert max(run(_undivided_rest, q)[:2]) < 1e-6


def test_auto_counts_what_a_draft_token_costs_to_draft(runners: Any, target_dir: Path) -> None:
    assert best_length(0.6, 8) > 0  # drafts that cost nothing pay at 60% accepted
    assert best_length(0.6, 8, draft_cost=0.5) == 0  # a draft model half the target's cost does not
    assert 0 < best_length(0.85, 8, draft_cost=0.3) < best_length(0.85, 8)  # shorter drafts where each costs
    want = generate(runners("off", None), PROMPT, max_tokens=40, ignore_eos=True).tokens
    drafted = {}
    for cost in (0.1, 20.0):  # a cheap draft model, and one dearer than any draft could repay
        spec = runners("auto", target_dir)
        assert spec.speculation is not None and spec.speculation.draft_model is not None
        spec.speculation.draft_model.cost = cost
        assert generate(spec, PROMPT, max_tokens=40, ignore_eos=True).tokens == want
        drafted[cost] = settled(spec).stats()["spec_model_draft_tokens"]
    # Cheap: it drafts while the answer has nothing to copy; dear: only probes, ever rarer.
    # (Once the answer repeats itself, prompt lookup drafts instead.)
    assert drafted[0.1] > drafted[20.0] > 0


# -- pairings that cannot work -------------------------------------------------------------------
def test_draft_settings_are_checked_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="needs speculative_decoding"):
        Settings(home=tmp_path, speculative_decoding="off", draft_models={"a": "b"})
    with pytest.raises(ValidationError, match="two different models"):
        Settings(home=tmp_path, draft_models={"a": "a"})


@pytest.fixture
def paired(settings: Settings, target_dir: Path, other_dir: Path, tmp_path: Path) -> Iterator[Platform]:
    """tiny-chat, a draft of it (other weights, same tokenizer), one with another tokenizer, and an encoder."""
    platform = Platform.open(settings)
    registry = platform.registry
    registry.pull(f"file:{target_dir}", name="tiny-chat")
    registry.pull(f"file:{other_dir}", name="tiny-draft")
    strange = tmp_path / "strange"
    shutil.copytree(other_dir, strange)
    tokenizer = AutoTokenizer.from_pretrained(strange)
    tokenizer.add_tokens(["<|strange|>"])
    tokenizer.save_pretrained(strange)
    registry.pull(f"file:{strange}", name="tiny-strange")
    yield platform
    platform.close()


def _engine(platform: Platform, **options: Any) -> LocalEngine:
    return LocalEngine(platform.registry, platform.settings.model_copy(update=options))


def test_a_pairing_that_cannot_work_stops_the_start(
    paired: Platform, tiny_chat_dir: Path, tiny_encoder_dir: Path, tmp_path: Path
) -> None:
    """A draft with another tokenizer, one not registered, not a generating model, or of an
    architecture the lean layers do not serve: the engine does not start, and the error names the
    setting; a target registered later is checked when it loads."""
    paired.registry.pull(f"file:{tiny_encoder_dir}", name="tiny-embed")
    biased = tmp_path / "biased"
    _biased_llama(tiny_chat_dir).save_pretrained(biased)
    AutoTokenizer.from_pretrained(tiny_chat_dir).save_pretrained(biased)
    paired.registry.pull(f"file:{biased}", name="tiny-biased")
    for draft, message in (
        ("tiny-biased", "draft_models: tiny-biased is not an architecture the lean decode step serves"),
        ("tiny-strange", "draft_models: tiny-strange cannot draft for tiny-chat: their tokenizers differ"),
        ("nowhere", "draft_models: nowhere, the draft model of tiny-chat, is not registered"),
        ("tiny-embed", "draft_models: tiny-embed is not a chat or completion model"),
    ):
        with pytest.raises(ModelLoadError, match=message):
            _engine(paired, draft_models={"tiny-chat": draft})
    engine = _engine(paired, draft_models={"tiny-chat": "tiny-draft", "later-model": "tiny-strange"})
    with pytest.raises(ModelLoadError, match=r"served by the llama\.cpp backend, which does not draft"):
        engine.models.backends.named("llama.cpp").draft_for(paired.registry.get("tiny-chat"))
    # A load checks too, whichever the backend (here the torch one, made one that does not draft
    # and whose own load would not look).
    backend = engine.models.backends.named("torch")
    backend.drafts = False  # type: ignore[misc]
    backend.load = lambda record: pytest.fail("loaded")  # type: ignore[method-assign]
    with pytest.raises(ModelLoadError, match="served by the torch backend, which does not draft"):
        engine._load(paired.registry.get("tiny-chat").id)
    # A cluster replica leaves the pairings to its loads: one broken later stops no replica.
    broken = paired.settings.model_copy(update={"draft_models": {"tiny-chat": "tiny-strange"}})
    replica = LocalEngine(paired.registry, broken, check_drafts=False)
    with pytest.raises(ModelLoadError, match="their tokenizers differ"):
        replica._load(paired.registry.get("tiny-chat").id)


def test_a_runner_that_does_not_speculate_refuses_a_draft(runners: Any, other_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="draft_models gives model the draft model draft, but model does not"):
        runners("off", other_dir)


def test_a_paired_model_loads_with_its_draft_and_counts_its_memory(paired: Platform) -> None:
    plain = _engine(paired).models.backends.named("torch")
    drafting = _engine(paired, draft_models={"tiny-chat": "tiny-draft"}).models.backends.named("torch")
    record, draft = paired.registry.get("tiny-chat"), paired.registry.get("tiny-draft")
    # The draft's weights (and packed copies) beside the target's, one load overhead, and its
    # cache of one row as long as the target's context.
    cache = kv_width(AutoConfig.from_pretrained(paired.registry.model_dir(draft)).to_dict()) * 4 * 256
    assert drafting.estimate_bytes(record) == (
        plain.estimate_bytes(record) + plain.estimate_bytes(draft) - LOAD_OVERHEAD_BYTES + cache
    )
    runner = drafting.load(record)
    try:
        assert isinstance(runner, CausalRunner) and runner.speculation is not None
        assert runner.speculation.draft_model is not None and runner.speculation.draft_model.name == "tiny-draft"
    finally:
        runner.close()
