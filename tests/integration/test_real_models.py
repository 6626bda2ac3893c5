"""The real server with SmolLM2-135M-Instruct and all-MiniLM-L6-v2, through the official openai client."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

from tests.integration.conftest import ADMIN_KEY, Server, start_server

pytestmark = pytest.mark.integration
CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def test_models_are_listed_with_registry_fields(server: Server) -> None:
    models = {m.id: m for m in server.client().models.list().data}
    assert {CHAT_MODEL, EMBED_MODEL} <= set(models)
    assert models[CHAT_MODEL].task == "chat"  # type: ignore[attr-defined]
    assert models[EMBED_MODEL].task == "embedding"  # type: ignore[attr-defined]
    assert models[CHAT_MODEL].parameter_count > 100_000_000  # type: ignore[attr-defined]


def test_capital_of_france_is_paris(server: Server) -> None:
    r = server.client().chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0
    )
    assert "Paris" in (r.choices[0].message.content or "")
    assert r.choices[0].finish_reason == "stop"


def test_stream_arrives_in_chunks_and_ends_cleanly(server: Server) -> None:
    stream = server.client().chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Write two sentences about the sea."}],
        temperature=0,
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 5
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 5
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_embeddings_rank_a_paraphrase_above_an_unrelated_sentence(server: Server) -> None:
    texts = ["The cat sits on the mat.", "A cat is sitting on a rug.", "Stock markets fell sharply today."]
    r = server.client().embeddings.create(model=EMBED_MODEL, input=texts)
    v = np.array([d.embedding for d in r.data])
    assert v.shape == (3, 384)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2


def test_eight_concurrent_requests_all_succeed_and_match_solo_answers(server: Server) -> None:
    client = server.client(timeout=300)
    questions = [f"What is {i} plus {i}?" for i in range(8)]

    def ask(q: str) -> str:
        r = client.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=24
        )
        return r.choices[0].message.content or ""

    solo = ask(questions[3])
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, questions))
    assert all(answers)
    assert answers[3] == solo  # batching with other requests does not change a greedy answer


def test_bad_inputs_get_openai_errors_and_the_server_stays_up(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert nf.value.code == "model_not_found"
    for bad, param in [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 1.2}, "top_p"),
        ({"n": 100}, "n"),
        ({"max_tokens": 9000}, "max_tokens"),
    ]:
        with pytest.raises(openai.BadRequestError) as br:
            client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], **bad)  # type: ignore[call-overload]
        assert br.value.body["param"] == param  # type: ignore[index]
    long_prompt = "hello " * 9000
    with pytest.raises(openai.BadRequestError) as ctx:
        client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": long_prompt}])
    assert ctx.value.code == "context_length_exceeded"
    big = httpx.post(
        f"{server.url}/v1/embeddings",
        headers=AUTH,
        content=json.dumps({"model": EMBED_MODEL, "input": "x" * (9 * 1024 * 1024)}),
    )
    assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_disconnect_mid_stream_stops_generation(server: Server) -> None:
    def generated() -> int:
        stats = httpx.get(f"{server.url}/v1/admin/engine", headers=AUTH).json()
        return sum(m.get("tokens_generated", 0) for m in stats["models"].values())

    before = generated()
    body = {
        "model": CHAT_MODEL,
        "stream": True,
        "max_tokens": 2000,
        "temperature": 1.5,
        "seed": 1,
        "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
    }
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", headers=AUTH, json=body, timeout=60) as resp:
        for i, _ in enumerate(resp.iter_lines()):
            if i >= 5:
                break
    time.sleep(1.5)
    settled = generated()
    time.sleep(1.5)
    assert generated() == settled  # nothing more is computed for the departed client
    assert settled - before < 200


def test_sigterm_drains_in_flight_streams_then_exits_zero(server: Server) -> None:
    """SIGTERM while a stream is open on a second server: the stream still ends with [DONE], exit 0."""
    import signal
    import threading

    server = start_server(server.home)  # its own process: the shared one keeps serving the other tests
    body = {
        "model": CHAT_MODEL,
        "stream": True,
        "max_tokens": 12,  # short: under a loaded CI machine 40 tokens could outlast the drain timeout
        "temperature": 0,
        "messages": [{"role": "user", "content": "Count from one to twenty in words."}],
    }
    lines: list[str] = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", headers=AUTH, json=body, timeout=120) as resp:
        stream = resp.iter_lines()
        lines.append(next(stream))
        threading.Timer(0.2, server.process.send_signal, args=(signal.SIGTERM,)).start()
        lines.extend(stream)
    assert [line for line in lines if line][-1] == "data: [DONE]"
    assert server.process.wait(timeout=60) == 0
