"""The Responses API through the official ``openai`` client, on the tiny models: text and message
input, instructions, stored turns followed by previous_response_id, streaming events, the
file_search tool citing the file it retrieved, tenant isolation and refused fields."""

from __future__ import annotations

import io
import time

import openai
import pytest
from fastapi.testclient import TestClient

from llmos.platform import Platform

ARTICLE = "Refunds are paid back to the original card within five working days."


@pytest.fixture
def store_id(client: openai.OpenAI) -> str:
    file_id = client.files.create(file=("refunds.md", io.BytesIO(ARTICLE.encode())), purpose="assistants").id
    vs = client.vector_stores.create(file_ids=[file_id], extra_body={"embedding_model": "tiny-embed"})
    deadline = time.monotonic() + 60
    while client.vector_stores.retrieve(vs.id).file_counts.completed != 1:
        assert time.monotonic() < deadline, "file not processed"
        time.sleep(0.05)
    return vs.id


def test_file_search_cites_the_retrieved_file(client: openai.OpenAI, store_id: str) -> None:
    response = client.responses.create(
        model="tiny-chat",
        input=ARTICLE,  # the tiny encoder's vectors are random: the same text finds its chunk
        instructions="Answer briefly.",
        tools=[{"type": "file_search", "vector_store_ids": [store_id], "max_num_results": 2}],
        include=["file_search_call.results"],
        max_output_tokens=8,
        temperature=0,
    )
    assert response.object == "response" and response.status in ("completed", "incomplete")
    call, message = response.output
    assert call.type == "file_search_call" and call.queries == [ARTICLE]
    assert call.results and call.results[0].text == ARTICLE and call.results[0].filename == "refunds.md"
    assert message.type == "message" and message.role == "assistant"
    citation = message.content[0].annotations[0]
    assert citation.type == "file_citation" and citation.filename == "refunds.md" and citation.index == 0
    assert citation.file_id == call.results[0].file_id
    assert response.usage.output_tokens <= 8 and response.usage.input_tokens > 20
    assert isinstance(response.output_text, str)


def test_turns_are_stored_and_chained(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model="tiny-chat",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Hello " * 30}]}],
        max_output_tokens=4,
        temperature=0,
    )
    assert client.responses.retrieve(first.id).output_text == first.output_text
    second = client.responses.create(
        model="tiny-chat", input="And again?", previous_response_id=first.id, max_output_tokens=4, temperature=0
    )
    assert second.previous_response_id == first.id
    # The second prompt held the first turn (its 30 words and the answer): more input tokens than the turn alone.
    alone = client.responses.create(model="tiny-chat", input="And again?", max_output_tokens=4, store=False)
    assert second.usage.input_tokens > alone.usage.input_tokens + 30
    items = client.responses.input_items.list(second.id).data
    assert [i.content[0].text for i in items] == ["And again?"]  # type: ignore[union-attr]
    with pytest.raises(openai.NotFoundError):  # not stored
        client.responses.retrieve(alone.id)
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


def test_streamed_events(client: openai.OpenAI, store_id: str) -> None:
    stream = client.responses.create(
        model="tiny-chat",
        input=ARTICLE,
        tools=[{"type": "file_search", "vector_store_ids": [store_id]}],
        max_output_tokens=6,
        temperature=0,
        stream=True,
    )
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.file_search_call.searching" in kinds and "response.output_text.done" in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = events[-1].response  # type: ignore[union-attr]
    assert done.output_text == text and done.output[-1].content[0].annotations[0].filename == "refunds.md"
    assert client.responses.retrieve(done.id).output_text == text


def test_other_tenants_ids_and_refused_fields(
    http: TestClient, client: openai.OpenAI, store_id: str, loaded_platform: Platform
) -> None:
    mine = client.responses.create(model="tiny-chat", input="Hi", max_output_tokens=2)
    loaded_platform.tenants.create("rival")
    _, secret = loaded_platform.keys.create("rival-app", tenant="rival", scopes=("inference", "files"))
    rival = openai.OpenAI(base_url="http://testserver/v1", api_key=secret, http_client=http, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        rival.responses.create(model="tiny-chat", input="Hi", previous_response_id=mine.id)
    with pytest.raises(openai.NotFoundError):
        rival.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        rival.responses.create(
            model="tiny-chat", input="Hi", tools=[{"type": "file_search", "vector_store_ids": [store_id]}]
        )
    for extra, param in [
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.file_search.type"),
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
    ]:
        with pytest.raises(openai.BadRequestError) as exc:
            client.responses.create(model="tiny-chat", input="Hi", extra_body=extra)
        assert str(exc.value.body["param"]).startswith(param.split(".")[0]), (extra, exc.value.body)  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model="tiny-embed", input="Hi")
    assert exc.value.body["param"] == "model"  # type: ignore[index]
