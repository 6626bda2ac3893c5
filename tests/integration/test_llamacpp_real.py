"""SmolLM2's original Q4_1 GGUF served by the llama.cpp backend, through the official openai
client, against llama-cpp-python's own single-stream generation on the same file."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import ADMIN_KEY, Server, start_server, stop_server

llama_cpp = pytest.importorskip("llama_cpp", reason="the llama.cpp backend needs llama-cpp-python (make install)")
pytestmark = pytest.mark.integration
CHAT_MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def llama_server(server: Server) -> Iterator[Server]:
    """A second server on the same home (the models are pulled), serving GGUF models with llama.cpp."""
    srv = start_server(server.home, gguf_backend="llama.cpp")
    yield srv
    assert stop_server(srv) == 0


def _gguf(home: Path) -> Path:
    files = sorted(home.glob("models/*/SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert files, "the pull kept no GGUF beside the conversion"
    return files[0]


def test_greedy_answers_are_llama_cpp_s_own(llama_server: Server) -> None:
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Name three colors of the rainbow."}]
    r = llama_server.client().chat.completions.create(model=CHAT_MODEL, messages=messages, temperature=0, max_tokens=32)
    gguf = _gguf(llama_server.home)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    reference = llama_cpp.Llama(str(gguf), n_ctx=512, n_threads=2, verbose=False)
    tokens: list[int] = []
    for token in reference.generate(prompt, top_k=1, temp=0.0):
        if token == tokenizer.eos_token_id or len(tokens) == 32:
            break
        tokens.append(token)
    assert r.choices[0].message.content == tokenizer.decode(tokens, skip_special_tokens=True)
    assert r.usage is not None and r.usage.completion_tokens == len(tokens)
    engine = httpx.get(f"{llama_server.url}/v1/admin/engine", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    served = [m for m in engine["models"].values() if m["name"] == CHAT_MODEL]
    assert served and served[0]["backend"] == "llama.cpp"


def test_concurrent_streams_all_finish_and_share_the_system_prompt(llama_server: Server) -> None:
    """Eight streams at once, each about its own number. Unlike the torch backend's, llama.cpp's
    products are not batch-invariant (a batch with prompt chunks takes other kernels than one
    token alone), so a greedy answer in company may differ from the same one alone: each answer
    is checked to be about its own question (a row reading another's cache would not be)."""
    client = llama_server.client(timeout=300)
    numbers = [13, 27, 38, 46, 52, 64, 79, 85]
    questions = [f"What is {n} plus {n}?" for n in numbers]

    def ask(question: str) -> tuple[str, str | None]:
        stream = client.chat.completions.create(
            model=CHAT_MODEL,
            messages=[{"role": "user", "content": question}],
            temperature=0,
            max_tokens=24,
            stream=True,
        )
        text, finish = "", None
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, questions))
    assert all(finish in ("stop", "length") for _, finish in answers)
    assert all(str(n) in text for n, (text, _) in zip(numbers, answers, strict=True)), answers
    engine = httpx.get(f"{llama_server.url}/v1/admin/engine", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    served = next(m for m in engine["models"].values() if m["name"] == CHAT_MODEL)
    assert served["peak_rows"] > 1 and served["prefix_cache_hits"] >= 8


def test_bad_input_gets_an_openai_error_and_the_server_stays_up(llama_server: Server) -> None:
    client = llama_server.client()
    huge = "word " * 9000
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": huge}], max_tokens=8)
    assert refused.value.status_code == 400
    assert refused.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    r = client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert r.choices[0].message.content
