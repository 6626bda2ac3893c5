"""Vector stores through the official ``openai`` client: upload, attach, processing states,
search with filters, threshold and hybrid ranking, rebuilt indexes, tenant isolation, bad input."""

from __future__ import annotations

import io
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from llmos.api import create_app
from llmos.platform import Platform
from llmos.registry.vector_tables import VectorChunkRow, VectorStoreRow
from llmos.retrieval.chunking import StaticChunking
from llmos.retrieval.documents import DocumentError, document_text
from tests.unit.test_rerank import build_cross_encoder, cross_reference

DOCS = {
    "returns.txt": "Returns are accepted within thirty days of delivery when the item is unused.",
    "shipping.md": "# Shipping\n\nParcels leave the warehouse every weekday and arrive in two days.",
    "warranty.html": "<html><head><style>p{}</style></head><body><p>The warranty covers defects "
    "for two years.</p><script>var x = 1;</script></body></html>",
}
ATTRIBUTES = {
    "returns.txt": {"topic": "returns", "year": 2024, "public": True},
    "shipping.md": {"topic": "shipping", "year": 2025, "public": True},
    "warranty.html": {"topic": "warranty", "year": 2026, "public": False},
}


def _pdf(text: str) -> bytes:
    """A one-page PDF whose page shows ``text`` (Helvetica), with a correct cross-reference table."""
    stream = f"BT /F1 12 Tf 72 712 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def _upload(client: openai.OpenAI, name: str, content: str | bytes) -> str:
    data = content.encode() if isinstance(content, str) else content
    return client.files.create(file=(name, io.BytesIO(data)), purpose="assistants").id


def _settle(client: openai.OpenAI, store_id: str) -> list[Any]:
    """The store's files once none is in_progress (processing runs off the request path)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        files = client.vector_stores.files.list(store_id).data
        if all(f.status != "in_progress" for f in files):
            return files
        time.sleep(0.05)
    pytest.fail("files still in progress")


@pytest.fixture
def store(client: openai.OpenAI) -> tuple[str, dict[str, str]]:
    ids = {name: _upload(client, name, text) for name, text in DOCS.items()}
    vs = client.vector_stores.create(name="help", extra_body={"embedding_model": "tiny-embed"})
    assert vs.status == "completed" and vs.file_counts.total == 0
    batch = client.vector_stores.file_batches.create(
        vs.id,
        files=[
            {
                "file_id": ids[name],
                "attributes": ATTRIBUTES[name],
                "chunking_strategy": {
                    "type": "static",
                    "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 0},
                },
            }
            for name in DOCS
        ],
    )
    assert batch.object == "vector_store.files_batch" and batch.file_counts.total == 3
    files = _settle(client, vs.id)
    assert {f.status for f in files} == {"completed"}
    assert all(f.usage_bytes > 0 and f.last_error is None for f in files)
    done = client.vector_stores.file_batches.retrieve(batch.id, vector_store_id=vs.id)
    assert done.status == "completed" and done.file_counts.completed == 3
    return vs.id, ids


def _search(client: openai.OpenAI, store_id: str, query: str, **kwargs: Any) -> list[Any]:
    return client.vector_stores.search(store_id, query=query, **kwargs).data


def test_search_ranks_filters_and_thresholds(client: openai.OpenAI, store: tuple[str, dict[str, str]]) -> None:
    store_id, ids = store
    vs = client.vector_stores.retrieve(store_id)
    assert vs.file_counts.completed == 3 and vs.usage_bytes == sum(f.usage_bytes for f in _settle(client, store_id))
    text = DOCS["returns.txt"]
    hits = _search(client, store_id, text)
    assert hits[0].file_id == ids["returns.txt"] and hits[0].filename == "returns.txt"
    assert hits[0].score == pytest.approx(1.0, abs=1e-4) and hits[0].content[0].text == text
    assert hits[0].attributes == {"topic": "returns", "year": 2024, "public": True}

    only_new = _search(client, store_id, text, filters={"type": "gte", "key": "year", "value": 2025})
    assert {h.file_id for h in only_new} == {ids["shipping.md"], ids["warranty.html"]}
    compound = {
        "type": "or",
        "filters": [
            {"type": "eq", "key": "topic", "value": "returns"},
            {
                "type": "and",
                "filters": [
                    {"type": "eq", "key": "public", "value": False},
                    {"type": "lt", "key": "year", "value": 2027},
                ],
            },
        ],
    }
    assert {h.file_id for h in _search(client, store_id, text, filters=compound)} == {
        ids["returns.txt"],
        ids["warranty.html"],
    }
    assert {
        h.file_id
        for h in _search(
            client, store_id, text, filters={"type": "nin", "key": "topic", "value": ["returns", "shipping"]}
        )
    } == {ids["warranty.html"]}

    strict = _search(client, store_id, text, ranking_options={"score_threshold": 0.9999})
    assert [h.file_id for h in strict] == [ids["returns.txt"]]
    assert len(_search(client, store_id, text, max_num_results=1)) == 1

    # The warranty's words (HTML text, not its markup) rank it first by BM25 fused with vectors.
    hybrid = _search(
        client,
        store_id,
        "warranty defects",
        ranking_options={"hybrid_search": {"embedding_weight": 0.1, "text_weight": 1}},
    )
    assert hybrid[0].file_id == ids["warranty.html"] and "var x" not in hybrid[0].content[0].text


def test_search_reranked_by_a_cross_encoder(
    client: openai.OpenAI,
    store: tuple[str, dict[str, str]],
    loaded_platform: Platform,
    tiny_encoder_dir: Path,
    tmp_path: Path,
) -> None:
    """Reranking goes through /v1/rerank's scoring path: each hit's score is the cross-encoder's
    relevance of (query, chunk) as transformers computes it, and the hits are ordered by it."""
    store_id, _ = store
    directory = build_cross_encoder(tiny_encoder_dir, tmp_path / "ce")
    loaded_platform.registry.pull(f"file:{directory}", name="tiny-ce")
    query = "how long does shipping take"
    plain = _search(client, store_id, query)
    ranked = _search(client, store_id, query, extra_body={"ranking_options": {"rerank_model": "tiny-ce"}})
    texts = [h.content[0].text for h in plain]
    expected = dict(zip(texts, cross_reference(directory, query, texts), strict=True))
    assert sorted(h.content[0].text for h in ranked) == sorted(texts)
    assert [h.score for h in ranked] == sorted((h.score for h in ranked), reverse=True)
    for hit in ranked:
        assert hit.score == pytest.approx(expected[hit.content[0].text], abs=1e-4)
    assert [h.score for h in plain] != [h.score for h in ranked]
    cut = _search(
        client,
        store_id,
        query,
        extra_body={"ranking_options": {"rerank_model": "tiny-ce", "score_threshold": ranked[0].score}},
    )
    assert ranked[0].score > ranked[1].score  # the lower ones may tie at six decimals
    assert [h.content[0].text for h in cut] == [ranked[0].content[0].text]
    refused: list[tuple[dict[str, Any], type[openai.APIStatusError]]] = [
        ({"ranker": "none", "rerank_model": "tiny-ce"}, openai.BadRequestError),
        ({"rerank_model": "no-such-model"}, openai.NotFoundError),
    ]
    for options, error in refused:
        with pytest.raises(error):
            _search(client, store_id, query, extra_body={"ranking_options": options})


def test_a_chunk_longer_than_the_reranker_takes_is_scored_on_its_beginning(
    client: openai.OpenAI, loaded_platform: Platform, tiny_encoder_dir: Path, tmp_path: Path
) -> None:
    """The store's chunks are the platform's own cut, sized for the embedding model: a reranked
    search scores one longer than the cross-encoder takes on its beginning, where /v1/rerank,
    given the same text by a client, refuses it (400 naming ``documents``)."""
    directory = build_cross_encoder(tiny_encoder_dir, tmp_path / "ce")
    loaded_platform.registry.pull(f"file:{directory}", name="tiny-ce")
    long_text = "Shipping takes three to five days for every parcel we send. " * 40
    file_id = _upload(client, "long.txt", long_text)
    vs = client.vector_stores.create(name="long", extra_body={"embedding_model": "tiny-embed"})
    strategy = {"type": "static", "static": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 0}}
    client.vector_stores.files.create(vs.id, file_id=file_id, chunking_strategy=strategy)  # type: ignore[arg-type]
    assert {f.status for f in _settle(client, vs.id)} == {"completed"}
    query = "how long does shipping take"
    ranked = _search(client, vs.id, query, extra_body={"ranking_options": {"rerank_model": "tiny-ce"}})
    assert ranked and all(0.0 <= hit.score <= 1.0 for hit in ranked)
    assert len(ranked[0].content[0].text) > 1000  # the whole chunk comes back, only its score read less
    with pytest.raises(openai.BadRequestError) as refused:
        client.post(
            "/rerank",
            body={"model": "tiny-ce", "query": query, "documents": [ranked[0].content[0].text]},
            cast_to=object,
        )
    assert refused.value.param == "documents"


def test_bad_search_and_chunking_input_is_refused(client: openai.OpenAI, store: tuple[str, dict[str, str]]) -> None:
    store_id, ids = store
    cases: list[tuple[dict[str, Any], str]] = [
        ({"filters": {"type": "eq", "key": "colour", "value": "red"}}, "filters"),
        ({"filters": {"type": "gt", "key": "year", "value": "soon"}}, "filters"),
        ({"filters": {"type": "xor", "filters": []}}, "filters"),
        ({"max_num_results": 51}, "max_num_results"),
        ({"ranking_options": {"score_threshold": 1.5}}, "ranking_options.score_threshold"),
        ({"rewrite_query": True}, "rewrite_query"),
        ({"query_expansion": True}, "query_expansion"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as exc:
            client.vector_stores.search(store_id, query="returns", extra_body=extra)
        assert exc.value.body["param"] == param, extra  # type: ignore[index]
    for static, param in [
        ({"max_chunk_size_tokens": 99, "chunk_overlap_tokens": 0}, "max_chunk_size_tokens"),
        ({"max_chunk_size_tokens": 4097, "chunk_overlap_tokens": 0}, "max_chunk_size_tokens"),
        ({"max_chunk_size_tokens": 200, "chunk_overlap_tokens": 101}, "chunk_overlap_tokens"),
    ]:
        with pytest.raises(openai.BadRequestError) as exc:
            client.vector_stores.files.create(
                vector_store_id=store_id,
                file_id=ids["returns.txt"],
                chunking_strategy={"type": "static", "static": static},  # type: ignore[typeddict-item]
            )
        assert exc.value.body["param"] == f"chunking_strategy.static.{param}"  # type: ignore[index]
    # Nothing half-attached: the file is still completed with its chunks.
    assert client.vector_stores.files.retrieve(ids["returns.txt"], vector_store_id=store_id).status == "completed"
    with pytest.raises(openai.BadRequestError) as exc:
        client.vector_stores.files.create(
            vector_store_id=store_id, file_id=ids["returns.txt"], attributes={"k" * 65: 1}
        )
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.files.create(vector_store_id=store_id, file_id="file-" + "0" * 24)
    with pytest.raises(openai.BadRequestError) as exc:
        client.vector_stores.create(extra_body={"embedding_model": "tiny-chat"})
    assert exc.value.body["param"] == "embedding_model"  # type: ignore[index]


def test_documents_of_every_type_and_broken_ones(client: openai.OpenAI) -> None:
    vs = client.vector_stores.create(extra_body={"embedding_model": "tiny-embed"})
    good = {
        "manual.pdf": _pdf("Reset the router by holding the button"),
        "faq.jsonl": '{"q": "Can I pay by card?", "a": "Yes, every card."}\n{"q": "Cash?", "a": "No."}\n',
        # One 4096-token chunk, far more than the tiny encoder's 128 positions: embedded by its start.
        "long.txt": " ".join(f"word{i}" for i in range(3000)),
    }
    bad = {"setup.exe": b"MZ\x90\x00binary", "broken.pdf": b"%PDF-1.4 not really", "latin.txt": b"caf\xe9"}
    ids = {name: _upload(client, name, data) for name, data in {**good, **bad}.items()}
    big = {"type": "static", "static": {"max_chunk_size_tokens": 4096, "chunk_overlap_tokens": 0}}
    for file_id in ids.values():
        client.vector_stores.files.create(vector_store_id=vs.id, file_id=file_id, chunking_strategy=big)  # type: ignore[arg-type]
    files = {f.id: f for f in _settle(client, vs.id)}
    for name in good:
        assert files[ids[name]].status == "completed", files[ids[name]].last_error
    errors = {name: files[ids[name]].last_error for name in bad}
    assert errors["setup.exe"].code == "unsupported_file"  # type: ignore[union-attr]
    assert errors["broken.pdf"].code == "invalid_file" and errors["latin.txt"].code == "invalid_file"  # type: ignore[union-attr]
    assert all(files[ids[n]].status == "failed" for n in bad)
    counts = client.vector_stores.retrieve(vs.id).file_counts
    assert (counts.completed, counts.failed, counts.total) == (3, 3, 6)
    # The store is still usable: the PDF's text and the JSON Lines' values were indexed.
    content = client.vector_stores.files.content(ids["manual.pdf"], vector_store_id=vs.id)
    assert "Reset the router" in "".join(part.text or "" for part in content)
    hits = _search(client, vs.id, "Can I pay by card?\nYes, every card.\n\nCash?\nNo.")
    assert hits[0].file_id == ids["faq.jsonl"]


def test_indexes_are_rebuilt_and_deletes_remove_chunks(
    client: openai.OpenAI, store: tuple[str, dict[str, str]], loaded_platform: Platform
) -> None:
    store_id, ids = store
    directory = loaded_platform.settings.home / "vector_stores" / store_id
    for name in ("vectors.faiss", "keywords.sqlite"):
        (directory / name).unlink()
    text = DOCS["shipping.md"]
    assert _search(client, store_id, text)[0].file_id == ids["shipping.md"]
    assert (directory / "vectors.faiss").exists() and (directory / "keywords.sqlite").exists()
    (directory / "vectors.faiss").write_bytes(b"damaged")
    loaded_platform.vector_stores.close()  # as after a restart: the damaged file is read again
    assert _search(client, store_id, text)[0].file_id == ids["shipping.md"]

    def chunks_of(file_id: str) -> int:
        with loaded_platform.db.session() as s:
            return int(s.scalar(select(func.count()).where(VectorChunkRow.file_id == file_id)) or 0)

    assert chunks_of(ids["shipping.md"]) == 1
    deleted = client.vector_stores.files.delete(ids["shipping.md"], vector_store_id=store_id)
    assert deleted.deleted and chunks_of(ids["shipping.md"]) == 0
    assert ids["shipping.md"] not in {h.file_id for h in _search(client, store_id, text)}
    client.files.delete(ids["returns.txt"])  # a deleted upload leaves its stores too
    assert chunks_of(ids["returns.txt"]) == 0
    assert {f.id for f in client.vector_stores.files.list(store_id)} == {ids["warranty.html"]}
    assert client.vector_stores.delete(store_id).deleted and not directory.exists()
    assert chunks_of(ids["warranty.html"]) == 0


def test_another_tenants_stores_do_not_exist(
    http: TestClient, client: openai.OpenAI, store: tuple[str, dict[str, str]], loaded_platform: Platform
) -> None:
    store_id, ids = store
    loaded_platform.tenants.create("rival")
    _, secret = loaded_platform.keys.create("rival-app", tenant="rival", scopes=("inference", "files"))
    rival = openai.OpenAI(base_url="http://testserver/v1", api_key=secret, http_client=http, max_retries=0)
    for call in (
        lambda: rival.vector_stores.retrieve(store_id),
        lambda: rival.vector_stores.search(store_id, query="returns"),
        lambda: rival.vector_stores.files.list(store_id),
        lambda: rival.vector_stores.delete(store_id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    own = rival.vector_stores.create(extra_body={"embedding_model": "tiny-embed"})
    with pytest.raises(openai.NotFoundError):  # another tenant's file cannot be attached either
        rival.vector_stores.files.create(vector_store_id=own.id, file_id=ids["returns.txt"])
    assert [s.id for s in rival.vector_stores.list()] == [own.id]
    assert client.vector_stores.retrieve(store_id).file_counts.completed == 3


def test_expiry_and_updates(client: openai.OpenAI, loaded_platform: Platform) -> None:
    vs = client.vector_stores.create(
        name="old",
        metadata={"team": "support"},
        expires_after={"anchor": "last_active_at", "days": 2},
        extra_body={"embedding_model": "tiny-embed"},
    )
    assert vs.expires_after.days == 2 and vs.expires_at == vs.last_active_at + 2 * 86400  # type: ignore[union-attr]

    def idle(delta: timedelta) -> None:
        with loaded_platform.db.session() as s:
            s.get(VectorStoreRow, vs.id).last_active_at = datetime.now(UTC) - delta  # type: ignore[union-attr]

    idle(timedelta(hours=1))  # a search keeps the store active
    client.vector_stores.search(vs.id, query="anything")
    assert client.vector_stores.retrieve(vs.id).last_active_at >= time.time() - 60  # type: ignore[operator]
    with loaded_platform.db.session() as s:  # three days without activity
        s.get(VectorStoreRow, vs.id).last_active_at = datetime.now(UTC) - timedelta(days=3)  # type: ignore[union-attr]
    assert client.vector_stores.retrieve(vs.id).status == "expired"
    with pytest.raises(openai.BadRequestError) as exc:
        client.vector_stores.search(vs.id, query="anything")
    assert exc.value.body["code"] == "expired"  # type: ignore[index]
    updated = client.vector_stores.update(vs.id, name="new", expires_after=None)  # type: ignore[arg-type]
    assert updated.name == "new" and updated.expires_at is None and updated.metadata == {"team": "support"}
    with pytest.raises(openai.BadRequestError):
        client.vector_stores.create(expires_after={"anchor": "created_at", "days": 1})  # type: ignore[typeddict-item]


def test_static_chunks_overlap_and_cover_the_text() -> None:
    words = [f"w{i}" for i in range(250)]
    chunks = StaticChunking(100, 40).split(" ".join(words))
    assert [c.split()[0] for c in chunks] == ["w0", "w60", "w120", "w180"]
    assert all(len(c.split()) <= 100 for c in chunks) and chunks[-1].endswith("w249")
    assert StaticChunking(100, 0).split("one, two.") == ["one, two."]


def test_unreadable_documents(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"\x00\x01")
    with pytest.raises(DocumentError) as exc:
        document_text(path, "notes.txt")
    assert exc.value.code == "invalid_file"
    path.write_bytes(b"   \n")
    with pytest.raises(DocumentError):
        document_text(path, "empty.md")


def test_files_left_in_progress_are_processed_when_the_server_starts(loaded_platform: Platform) -> None:
    record, _ = loaded_platform.files.create(
        tenant="default", purpose="assistants", filename="notes.txt", chunks=[b"Left behind."], max_bytes=1 << 20
    )
    vs = loaded_platform.vector_stores.create(
        "default", name="", description=None, embedding_model="tiny-embed", metadata=None, expires_after_days=None
    )
    # Attached as a server does, which then stopped before processing it.
    loaded_platform.vector_stores.attach("default", vs.id, [(record.id, "notes.txt", None, StaticChunking())])
    with TestClient(create_app(platform=loaded_platform)):
        deadline = time.monotonic() + 60
        while loaded_platform.vector_stores.file("default", vs.id, record.id).status == "in_progress":
            assert time.monotonic() < deadline, "not resumed"
            time.sleep(0.05)
    assert loaded_platform.vector_stores.file("default", vs.id, record.id).status == "completed"
    assert loaded_platform.vector_stores.file_chunks(vs.id, record.id) == ["Left behind."]
