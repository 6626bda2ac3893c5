"""The customer-service assistant on the real server: help articles in a vector store embedded by
all-MiniLM-L6-v2, questions answered by SmolLM2 through the Responses API with file_search."""

from __future__ import annotations

import io
import time

import pytest

from tests.integration.conftest import Server

pytestmark = pytest.mark.integration
CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"
ARTICLES = {
    "refunds.md": "# Refunds\n\nRefunds are paid back to the original card within five working days.",
    "shipping.html": "<h1>Shipping</h1><p>Parcels are shipped from our warehouse in Lyon every weekday.</p>",
    "passwords.txt": "To reset your password, open Settings, choose Security and press Reset password.",
}


def test_file_search_answers_from_the_right_article(server: Server) -> None:
    client = server.client()
    ids = {
        name: client.files.create(file=(name, io.BytesIO(text.encode())), purpose="assistants").id
        for name, text in ARTICLES.items()
    }
    store = client.vector_stores.create(name="help", file_ids=list(ids.values()))
    assert store.embedding_model == EMBED_MODEL  # type: ignore[attr-defined]
    deadline = time.monotonic() + 120
    while client.vector_stores.retrieve(store.id).file_counts.completed < len(ids):
        assert time.monotonic() < deadline, client.vector_stores.files.list(store.id).data
        time.sleep(0.2)
    hits = client.vector_stores.search(store.id, query="How do I change my password?", max_num_results=1).data
    assert hits[0].filename == "passwords.txt"

    response = client.responses.create(
        model=CHAT_MODEL,
        input="Where are parcels shipped from?",
        tools=[{"type": "file_search", "vector_store_ids": [store.id], "max_num_results": 1}],
        include=["file_search_call.results"],
        temperature=0,
        max_output_tokens=40,
    )
    call, message = response.output
    assert call.type == "file_search_call" and call.results[0].filename == "shipping.html"  # type: ignore[union-attr,index]
    citation = message.content[0].annotations[0]  # type: ignore[union-attr]
    assert citation.type == "file_citation" and citation.file_id == ids["shipping.html"]
    assert "Lyon" in response.output_text
    client.vector_stores.delete(store.id)
