"""Prompt logprobs through the API: legacy completions' ``echo`` + ``logprobs`` (OpenAI's shape),
``max_tokens: 0`` scoring, vLLM's ``prompt_logprobs``, and the refusals before any work is queued."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmos.config import Settings
from tests.unit.test_api import assert_error, auth

TEXT = "The capital of France is Paris. Hello, how are you today?"


def reference(model_dir: Path, prompt: list[int]) -> torch.Tensor:
    """Every position's log-softmax over the vocabulary, from a transformers forward."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)


def complete(http: TestClient, **body: object) -> dict:
    resp = http.post("/v1/completions", headers=auth(), json={"model": "tiny-chat", **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_echo_with_max_tokens_0_scores_every_prompt_token(http: TestClient, tiny_chat_dir: Path) -> None:
    prompt = AutoTokenizer.from_pretrained(tiny_chat_dir)(TEXT)["input_ids"]
    full = reference(tiny_chat_dir, prompt)
    out = complete(http, prompt=TEXT, echo=True, logprobs=2, max_tokens=0)
    (choice,) = out["choices"]
    assert choice["text"] == TEXT and choice["finish_reason"] == "length"
    usage = {k: out["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    assert usage == {"prompt_tokens": len(prompt), "completion_tokens": 0, "total_tokens": len(prompt)}
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(prompt) and "".join(lp["tokens"]) == TEXT
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    expected = full[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(lp["token_logprobs"][1:]), expected, atol=1e-3)
    for i, top in enumerate(lp["top_logprobs"][1:]):
        assert lp["tokens"][i + 1] in top and len(top) <= 3  # the 2 most likely and the token itself
        assert max(top.values()) == pytest.approx(float(full[i].max()), abs=1e-3)
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(prompt))]


def test_echo_covers_the_prompt_then_the_generated_tokens(http: TestClient) -> None:
    out = complete(http, prompt=TEXT, echo=True, logprobs=1, max_tokens=3, temperature=0)
    (choice,) = out["choices"]
    lp = choice["logprobs"]
    generated = out["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == out["usage"]["prompt_tokens"] + generated
    assert choice["text"].startswith(TEXT)
    assert lp["text_offset"][-generated] == len(TEXT)  # the first generated token starts after the echo
    assert all(v is not None for v in lp["token_logprobs"][1:])


def test_a_streamed_echo_opens_with_the_scored_prompt(http: TestClient) -> None:
    body = {"model": "tiny-chat", "prompt": TEXT, "echo": True, "logprobs": 1, "max_tokens": 2, "temperature": 0}
    with http.stream("POST", "/v1/completions", headers=auth(), json=body | {"stream": True}) as resp:
        assert resp.status_code == 200
        lines = [line[6:] for line in resp.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    choices = [json.loads(line)["choices"][0] for line in lines]
    whole = complete(http, **body)["choices"][0]
    assert choices[0]["text"] == TEXT  # the echo, with the prompt's logprobs
    prompt_tokens = len(choices[0]["logprobs"]["tokens"])
    assert choices[0]["logprobs"]["token_logprobs"] == whole["logprobs"]["token_logprobs"][:prompt_tokens]
    assert "".join(c["text"] for c in choices) == whole["text"]


def test_token_id_prompts_lists_and_n_are_each_scored(http: TestClient, tiny_chat_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_chat_dir)
    prompts = [tok(t)["input_ids"] for t in ("Hello there", "A quick brown fox")]
    out = complete(http, prompt=prompts, echo=True, logprobs=0, max_tokens=0, n=2)
    assert len(out["choices"]) == 4
    for i, choice in enumerate(out["choices"]):
        prompt = prompts[i // 2]
        full = reference(tiny_chat_dir, prompt)
        expected = full[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
        assert choice["text"] == tok.decode(prompt)  # token ids echo as their text
        assert torch.allclose(torch.tensor(choice["logprobs"]["token_logprobs"][1:]), expected, atol=1e-3)


def test_vllm_prompt_logprobs_have_vllms_shape(http: TestClient, tiny_chat_dir: Path) -> None:
    prompt = AutoTokenizer.from_pretrained(tiny_chat_dir)(TEXT)["input_ids"]
    full = reference(tiny_chat_dir, prompt)
    out = complete(http, prompt=TEXT, prompt_logprobs=2, max_tokens=1, temperature=0)
    (choice,) = out["choices"]
    scored = choice["prompt_logprobs"]
    assert len(scored) == len(prompt) and scored[0] is None
    assert choice["logprobs"] is None and choice["text"] != TEXT  # not echoed: only the extra
    for i, entry in enumerate(scored[1:]):
        first = next(iter(entry))
        assert first == str(prompt[i + 1])  # the token itself first, then the most likely ones
        assert entry[first]["rank"] == int((full[i] > full[i, prompt[i + 1]]).sum()) + 1
        assert {e["rank"] for k, e in entry.items() if k != first} <= {1, 2}
        assert entry[first]["logprob"] == pytest.approx(float(full[i, prompt[i + 1]]), abs=1e-3)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"echo": True, "logprobs": 6, "max_tokens": 0}, "logprobs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ({"echo": True, "logprobs": 1, "max_tokens": 0, "prompt": "Hello world " * 400}, "messages"),
        ({"echo": True, "logprobs": 1, "max_tokens": 0, "model": "tiny-embed"}, "model"),
    ],
)
def test_bad_scoring_requests_get_400_naming_the_field(http: TestClient, change: dict, param: str) -> None:
    body = {"model": "tiny-chat", "prompt": TEXT, **change}
    assert_error(http.post("/v1/completions", headers=auth(), json=body), 400, param=param)
    assert complete(http, prompt="Hello", max_tokens=1)["choices"]  # the server is still up


def test_chat_prompt_logprobs_score_the_templated_prompt(http: TestClient, tiny_chat_dir: Path) -> None:
    messages = [{"role": "user", "content": "Hello, how are you today?"}]
    tok = AutoTokenizer.from_pretrained(tiny_chat_dir)
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    full = reference(tiny_chat_dir, prompt)
    body = {"model": "tiny-chat", "messages": messages, "max_tokens": 1, "prompt_logprobs": 1}
    resp = http.post("/v1/chat/completions", headers=auth(), json=body)
    assert resp.status_code == 200, resp.text
    scored = resp.json()["prompt_logprobs"]
    assert len(scored) == len(prompt) and scored[0] is None
    got = [entry[str(token)]["logprob"] for entry, token in zip(scored[1:], prompt[1:], strict=True)]
    expected = full[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(got), expected, atol=1e-3)
    body |= {"stream": True}
    assert_error(http.post("/v1/chat/completions", headers=auth(), json=body), 400, param="prompt_logprobs")


def test_a_model_llama_cpp_serves_refuses_prompt_scoring(
    settings: Settings, tiny_chat_dir: Path, tmp_path: Path
) -> None:
    """llama.cpp's runner keeps no prompt logits: its models refuse scoring with a 400 naming the field."""
    pytest.importorskip("llama_cpp", reason="the llama.cpp backend needs llama-cpp-python")
    from llmos.api import create_app
    from llmos.platform import Platform
    from tests.tiny_models import write_tiny_gguf

    gguf = write_tiny_gguf(tiny_chat_dir, tmp_path / "tiny-chat.F32.gguf")
    platform = Platform.open(settings.model_copy(update={"gguf_backend": "llama.cpp"}))
    try:
        platform.registry.pull(f"file:{gguf}", name="tiny-gguf")
        with TestClient(create_app(platform=platform)) as http:
            body = {"model": "tiny-gguf", "prompt": TEXT, "echo": True, "logprobs": 1, "max_tokens": 0}
            assert_error(http.post("/v1/completions", headers=auth(), json=body), 400, param="echo")
            body = {"model": "tiny-gguf", "prompt": TEXT, "prompt_logprobs": 1, "max_tokens": 1}
            assert_error(http.post("/v1/completions", headers=auth(), json=body), 400, param="prompt_logprobs")
            assert http.get("/v1/models", headers=auth()).status_code == 200  # the server is still up
    finally:
        platform.close()
