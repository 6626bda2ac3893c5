"""Prompt scoring on SmolLM2-135M-Instruct: served in float32, each prompt token's logprob equals
transformers' float32 forward of the same weights to 1e-3, and a token scored in the prompt has
the logprob it had when it was generated; served in bfloat16 (the default on this CPU), the scores
are as far from float32 as transformers' own bfloat16 forward is (ADR 0013's tolerances)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.integration.conftest import ADMIN_KEY, Server, start_server, stop_server

pytestmark = pytest.mark.integration
MODEL = "smollm2-135m-instruct"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
TEXTS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Water boils at 100 degrees Celsius at sea level; at altitude it boils at a lower temperature.",
]
FLOAT32_BOUND = 1e-3
BF16_SLACK = 0.02
"""How much further from float32 the served bf16 scores may be, on average, than transformers' bf16."""


def _model_dir(home: Path) -> Path:
    from llmos.config import Settings
    from llmos.platform import Platform

    platform = Platform.open(Settings(home=home))
    try:
        return platform.registry.model_dir(platform.registry.get(MODEL))
    finally:
        platform.close()


def _complete(server: Server, **body: object) -> dict:  # type: ignore[type-arg]
    resp = httpx.post(f"{server.url}/v1/completions", headers=AUTH, json={"model": MODEL, **body}, timeout=300)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def float32_server(server_home: Path) -> Iterator[Server]:
    srv = start_server(server_home, dtype="float32")
    yield srv
    assert stop_server(srv) == 0


@pytest.fixture(scope="module")
def reference(server_home: Path) -> dict[str, Any]:
    """The prompts' token ids and transformers' prompt logprobs in float32 and bfloat16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = _model_dir(server_home)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prompts = [tokenizer(text)["input_ids"] for text in TEXTS]
    out: dict[str, Any] = {"prompts": prompts}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
        scores = []
        for ids in prompts:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            scores.append(torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0])
        out[str(dtype)] = scores
    return out


def _served_scores(server: Server, prompts: list[list[int]]) -> list[torch.Tensor]:
    choices = sorted(_complete(server, prompt=prompts, echo=True, logprobs=1, max_tokens=0)["choices"],
                     key=lambda c: c["index"])  # fmt: skip
    out = []
    for choice, ids in zip(choices, prompts, strict=True):
        scored = choice["logprobs"]["token_logprobs"]
        assert len(scored) == len(ids) and scored[0] is None
        out.append(torch.tensor(scored[1:]))
    return out


def test_float32_prompt_logprobs_equal_the_weights_forward(float32_server: Server, reference: dict[str, Any]) -> None:
    served = _served_scores(float32_server, reference["prompts"])
    for got, want in zip(served, reference[str(torch.float32)], strict=True):
        assert float((got - want).abs().max()) <= FLOAT32_BOUND


def test_bfloat16_prompt_logprobs_are_as_close_to_float32_as_transformers_bfloat16(
    server: Server, reference: dict[str, Any]
) -> None:
    from llmos.engine.local import resolve_dtype

    if resolve_dtype("auto") != torch.bfloat16:
        pytest.skip("this CPU serves float32 by default")
    served = _served_scores(server, reference["prompts"])
    exact, rounded = reference[str(torch.float32)], reference[str(torch.bfloat16)]
    for got, truth, theirs in zip(served, exact, rounded, strict=True):
        ours_off, theirs_off = float((got - truth).abs().mean()), float((theirs - truth).abs().mean())
        assert ours_off <= theirs_off + BF16_SLACK, (ours_off, theirs_off)
        assert float((got - truth).abs().max()) < 0.5  # a wrong position or token moves logprobs by units


def test_a_token_scores_in_the_prompt_as_it_was_generated(float32_server: Server) -> None:
    generated = _complete(float32_server, prompt=TEXTS[0], max_tokens=8, temperature=0, logprobs=1)["choices"][0]
    tokens, logprobs = generated["logprobs"]["tokens"], generated["logprobs"]["token_logprobs"]
    assert len(tokens) == 8
    scored = _complete(float32_server, prompt=TEXTS[0] + generated["text"], echo=True, logprobs=1, max_tokens=0)
    tail = scored["choices"][0]["logprobs"]
    assert "".join(tail["tokens"][-len(tokens) :]) == "".join(tokens)  # the same tokens, re-read
    for got, want in zip(tail["token_logprobs"][-len(tokens) :], logprobs, strict=True):
        assert got == pytest.approx(want, abs=FLOAT32_BOUND)
