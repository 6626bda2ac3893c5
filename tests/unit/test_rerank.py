"""/v1/score and /v1/rerank: a cross-encoder's relevance, or a causal model's yes to the relevance
prompt, equal to the same weights run by transformers; bad input refused before any work."""

from __future__ import annotations

import math
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from llmos.engine.relevance import ANSWERS, RELEVANCE_PROMPT, _fitted
from llmos.platform import Platform
from tests.unit.test_api import assert_error, auth

QUERY = "What is the capital of France?"
DOCUMENTS = ["The capital of France is Paris.", "A quick brown fox jumps over the lazy dog.", "Hello, how are you?"]


def build_cross_encoder(encoder_dir: Path, root: Path) -> Path:
    """A one-label sequence-classification head on the tiny encoder (a cross-encoder's shape)."""
    from transformers import BertConfig, BertForSequenceClassification

    root.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (encoder_dir / name).exists():
            shutil.copy(encoder_dir / name, root / name)
    config = BertConfig.from_pretrained(encoder_dir)
    config.num_labels = 1
    config.id2label, config.label2id = {0: "relevant"}, {"relevant": 0}
    config.architectures = ["BertForSequenceClassification"]
    torch.manual_seed(11)
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # a random head scores every pair near 0.5; spread them, so ranks do not tie
        model.classifier.weight.mul_(300)
    model.save_pretrained(root, safe_serialization=True)
    return root


@pytest.fixture
def cross_encoder(loaded_platform: Platform, tiny_encoder_dir: Path, tmp_path: Path) -> Path:
    directory = build_cross_encoder(tiny_encoder_dir, tmp_path / "ce")
    loaded_platform.registry.pull(f"file:{directory}", name="tiny-ce")
    return directory


def cross_reference(directory: Path, query: str, documents: list[str]) -> list[float]:
    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    tok = AutoTokenizer.from_pretrained(directory)
    with torch.no_grad():
        logits = model(**tok([query] * len(documents), documents, padding=True, return_tensors="pt")).logits
    return torch.sigmoid(logits[:, 0]).tolist()


def causal_reference(directory: Path, query: str, document: str) -> float:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(directory)
    text = RELEVANCE_PROMPT.format(query=query, document=document)
    prompt = tok(text)["input_ids"]
    answer_logprobs = []
    for answer in ANSWERS:
        full = tok(text + answer)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), dim=-1)
        answer_logprobs.append(sum(float(lp[i - 1, full[i]]) for i in range(len(prompt), len(full))))
    yes, no = answer_logprobs
    return 1 / (1 + math.exp(no - yes))


def post(http: TestClient, path: str, body: dict) -> dict:
    resp = http.post(path, headers=auth(), json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_rerank_with_a_cross_encoder_orders_by_its_scores(http: TestClient, cross_encoder: Path) -> None:
    expected = cross_reference(cross_encoder, QUERY, DOCUMENTS)
    out = post(http, "/v1/rerank", {"model": "tiny-ce", "query": QUERY, "documents": DOCUMENTS, "top_n": 2})
    results = out["results"]
    order = sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])[:2]
    assert [r["index"] for r in results] == order
    for r in results:
        assert r["relevance_score"] == pytest.approx(expected[r["index"]], abs=1e-5)
        assert r["document"] == {"text": DOCUMENTS[r["index"]]}
    assert out["usage"]["total_tokens"] > 0
    bare = post(
        http,
        "/v1/rerank",
        {"model": "tiny-ce", "query": QUERY, "documents": [{"text": d} for d in DOCUMENTS], "return_documents": False},
    )
    assert len(bare["results"]) == 3 and all("document" not in r for r in bare["results"])


def test_score_has_vllms_shape(http: TestClient, cross_encoder: Path) -> None:
    expected = cross_reference(cross_encoder, QUERY, DOCUMENTS)
    out = post(http, "/v1/score", {"model": "tiny-ce", "text_1": QUERY, "text_2": DOCUMENTS})
    assert out["object"] == "list"
    assert [d["index"] for d in out["data"]] == [0, 1, 2] and {d["object"] for d in out["data"]} == {"score"}
    assert [d["score"] for d in out["data"]] == pytest.approx(expected, abs=1e-5)
    paired = post(http, "/v1/score", {"model": "tiny-ce", "text_1": [QUERY] * 3, "text_2": DOCUMENTS})
    assert [d["score"] for d in paired["data"]] == pytest.approx(expected, abs=1e-5)


def test_a_causal_model_reranks_by_its_yes_to_the_relevance_prompt(http: TestClient, tiny_chat_dir: Path) -> None:
    out = post(http, "/v1/rerank", {"model": "tiny-chat", "query": QUERY, "documents": DOCUMENTS})
    for r in out["results"]:
        expected = causal_reference(tiny_chat_dir, QUERY, DOCUMENTS[r["index"]])
        assert r["relevance_score"] == pytest.approx(expected, abs=1e-4)
    scores = [r["relevance_score"] for r in out["results"]]
    assert scores == sorted(scores, reverse=True)


def test_a_long_rerank_on_a_causal_model_stays_within_the_engines_pending_room(loaded_platform: Platform) -> None:
    """40 documents are 80 scoring requests; the engine takes 4 pending at most: the pairs go in
    a few at a time instead of the rerank failing with 503."""
    import asyncio

    from llmos.engine.local import LocalEngine

    engine = LocalEngine(
        loaded_platform.registry, loaded_platform.settings.model_copy(update={"max_pending_requests": 4})
    )

    async def main() -> list[float]:
        handle = await engine.resolve("tiny-chat")
        try:
            return (await engine.score_pairs(handle, [(QUERY, f"Paris {i}") for i in range(40)], tenant="t")).scores
        finally:
            await engine.shutdown()

    scores = asyncio.run(main())
    assert len(scores) == 40 and all(0 < s < 1 for s in scores)


def test_a_document_too_long_for_the_relevance_prompt_is_cut_only_when_asked(
    loaded_platform: Platform, tiny_chat_dir: Path
) -> None:
    """A causal reranker's pair past the model's context: a 400 naming ``documents`` for a
    client's text; with ``truncate`` (the platform's own chunks) its beginning that fits is scored,
    the same as scoring that beginning outright."""
    import asyncio

    from llmos.engine.local import LocalEngine
    from llmos.errors import ContextLengthExceededError

    engine = LocalEngine(loaded_platform.registry, loaded_platform.settings)
    long_document = "Paris is the capital of France and its largest city. " * 40

    async def main() -> tuple[float, float]:
        handle = await engine.resolve("tiny-chat")
        try:
            with pytest.raises(ContextLengthExceededError) as refused:
                await engine.score_pairs(handle, [(QUERY, long_document)], tenant="t")
            assert refused.value.param == "documents"
            cut = await engine.score_pairs(handle, [(QUERY, long_document)], tenant="t", truncate=True)
            fitted = await _fitted(engine, handle, QUERY, long_document)
            assert 0 < len(fitted) < len(long_document) and long_document.startswith(fitted)
            full = len(await engine.encode_text(handle, RELEVANCE_PROMPT.format(query=QUERY, document=fitted) + " yes"))
            assert full <= handle.info.context_length
            outright = await engine.score_pairs(handle, [(QUERY, fitted)], tenant="t")
            return cut.scores[0], outright.scores[0]
        finally:
            await engine.shutdown()

    cut, outright = asyncio.run(main())
    assert cut == pytest.approx(outright, abs=1e-6)


class CountingTokenizer:
    """A tokenizer that counts how often each text goes through it, as a pair's second text or alone."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.as_second: Counter[str] = Counter()
        self.alone: Counter[str] = Counter()

    def __call__(self, text: Any, text_pair: Any = None, **options: Any) -> Any:
        texts = [text] if isinstance(text, str) else list(text)
        if text_pair is None:
            self.alone.update(texts)
        else:
            self.as_second.update([text_pair] if isinstance(text_pair, str) else text_pair)
        return self.inner(text, text_pair, **options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_the_cross_encoder_tokenises_each_pair_once(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    """Its length check and its forward passes read one tokenisation of each pair (micro-batches
    of two here); a document cut to fit (``truncate``) scores as transformers' own cut of it, the
    query tokenised alone once for the whole search, and refused without ``truncate``."""
    from llmos.engine.torch_backend.classifier import ClassifierRunner
    from llmos.errors import ContextLengthExceededError

    directory = build_cross_encoder(tiny_encoder_dir, tmp_path / "ce")
    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    tokenizer = CountingTokenizer(AutoTokenizer.from_pretrained(directory))
    runner = ClassifierRunner(model, tokenizer, max_length=24, micro_batch=2)
    long_document = "the capital of france is paris and it is a large city " * 4
    documents = [*DOCUMENTS, long_document]

    with pytest.raises(ContextLengthExceededError) as refused:
        runner.score_pairs([(QUERY, d) for d in documents])
    assert refused.value.param == "documents" and "pair 3 has" in str(refused.value)
    tokenizer.as_second.clear()

    scored = runner.score_pairs([(QUERY, d) for d in documents], truncate=True)
    assert tokenizer.as_second == Counter(documents)  # each pair once
    assert tokenizer.alone == Counter([QUERY])  # the query alone once, to see it leaves room
    inner = tokenizer.inner
    cut = inner([QUERY], [long_document], truncation="only_second", max_length=24, return_tensors="pt")
    with torch.no_grad():
        expected_cut = torch.sigmoid(model(**cut).logits[:, 0]).item()
    expected = [*cross_reference(directory, QUERY, DOCUMENTS), expected_cut]
    assert scored.scores == pytest.approx(expected, abs=1e-5)
    whole = [len(inner(QUERY, d)["input_ids"]) for d in DOCUMENTS]
    assert scored.prompt_tokens == sum(whole) + 24

    with pytest.raises(ContextLengthExceededError, match="no part of its document fits"):
        runner.score_pairs([("paris " * 30, "a document")], truncate=True)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/rerank", {"query": QUERY, "documents": []}, "documents"),
        ("/v1/rerank", {"query": QUERY, "documents": ["x"] * 2049}, "documents"),
        ("/v1/rerank", {"query": QUERY, "documents": [""]}, "documents"),
        ("/v1/rerank", {"query": QUERY, "documents": DOCUMENTS, "top_n": 0}, "top_n"),
        ("/v1/rerank", {"query": QUERY, "documents": DOCUMENTS, "model": "tiny-embed"}, "model"),
        ("/v1/rerank", {"query": QUERY, "documents": ["Paris " * 300]}, "documents"),
        ("/v1/score", {"text_1": [QUERY, QUERY], "text_2": DOCUMENTS}, "text_1"),
        ("/v1/score", {"text_1": QUERY, "text_2": []}, "text_2"),
    ],
)
def test_bad_scoring_input_is_refused_naming_the_field(http: TestClient, path: str, body: dict, param: str) -> None:
    assert_error(http.post(path, headers=auth(), json={"model": "tiny-chat", **body}), 400, param=param)
    assert post(http, "/v1/rerank", {"model": "tiny-chat", "query": QUERY, "documents": ["Paris"]})["results"]
