"""Recommendations: a vector store's files as items, a user's liked items averaged into a profile
(each item the mean of its chunks), the store searched by it with seen items left out; checked
against the same arithmetic done here on the chunks' stored embeddings."""

from __future__ import annotations

from typing import Any

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient

from llmos.platform import Platform
from tests.conftest import ADMIN_KEY
from tests.unit.test_vector_stores import _settle, _upload

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
LONG = " ".join(f"chapter {i} of the long saga tells of ships, storms and harbours far away." for i in range(30))
ITEMS = {
    "kettle.txt": "An electric kettle that boils water in two minutes.",
    "teapot.txt": "A ceramic teapot for loose leaf tea.",
    "mugs.txt": "Four stoneware mugs for coffee and tea.",
    "tent.txt": "A two person tent for camping in the mountains.",
    "stove.txt": "A camping stove that burns gas, light enough for hiking.",
    "boots.txt": "Waterproof hiking boots with a firm sole.",
    "saga.txt": LONG,
    "novel.txt": "A novel about a sailor crossing the ocean in a storm.",
}


@pytest.fixture
def shop(client: openai.OpenAI) -> tuple[str, dict[str, str]]:
    ids = {name: _upload(client, name, text) for name, text in ITEMS.items()}
    store = client.vector_stores.create(name="shop", extra_body={"embedding_model": "tiny-embed"})
    chunking = {"type": "static", "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 0}}
    client.vector_stores.file_batches.create(
        store.id,
        files=[{"file_id": ids[n], "attributes": {"shelf": "books" if n in ("saga.txt", "novel.txt") else "home"},
                "chunking_strategy": chunking} for n in ITEMS],  # type: ignore[list-item]
    )  # fmt: skip
    assert {f.status for f in _settle(client, store.id)} == {"completed"}
    return store.id, ids


def unit(rows: Any) -> np.ndarray:
    matrix = np.asarray(rows, dtype=np.float64)
    return matrix / np.linalg.norm(matrix, axis=-1, keepdims=True)


def item_chunks(platform: Platform, store_id: str, ids: dict[str, str]) -> dict[str, np.ndarray]:
    """Every item's chunk embeddings as the store keeps them (the tiny encoder reads 64 tokens, so
    a chunk is embedded by its first ones: /v1/embeddings would refuse the whole chunk)."""
    out = {}
    for name, file_id in ids.items():
        stored = platform.vector_stores.embeddings(store_id, [file_id]).values()
        out[name] = unit([np.frombuffer(vector, dtype="<f4") for vector in stored])
    return out


def recommend(http: TestClient, store_id: str, **body: Any) -> Any:
    return http.post(f"/v1/vector_stores/{store_id}/recommendations", headers=AUTH, json=body)


def test_the_profile_is_the_mean_of_liked_items_and_seen_items_are_left_out(
    http: TestClient, loaded_platform: Platform, shop: tuple[str, dict[str, str]]
) -> None:
    store_id, ids = shop
    chunks = item_chunks(loaded_platform, store_id, ids)
    assert len(chunks["saga.txt"]) > 1  # an item of several chunks counts once, as their mean
    liked, seen = ["kettle.txt", "saga.txt"], ["mugs.txt"]
    profile = unit(np.mean([unit(chunks[n].mean(axis=0)) for n in liked], axis=0))
    expected = {n: float((c @ profile).max()) for n, c in chunks.items() if n not in liked + seen}
    ranked = sorted(expected, key=lambda n: -expected[n])

    resp = recommend(http, store_id, liked_file_ids=[ids[n] for n in liked], exclude_file_ids=[ids[n] for n in seen],
                     max_num_results=3)  # fmt: skip
    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    by_id = {file_id: name for name, file_id in ids.items()}
    names = [by_id[item["file_id"]] for item in data]
    assert len(names) == 3 and not set(names) & set(liked + seen)
    for item, name in zip(data, names, strict=True):
        assert item["score"] == pytest.approx(expected[name], abs=1e-4)
        assert item["filename"] == name and item["object"] == "vector_store.recommendation"
    if expected[ranked[2]] - expected[ranked[3]] > 1e-3:  # no near tie at the cut
        assert names == ranked[:3]

    everything = recommend(http, store_id, liked_file_ids=[ids["kettle.txt"]], max_num_results=50).json()["data"]
    assert len(everything) == len(ITEMS) - 1  # every other item once, however many chunks it has
    books = recommend(http, store_id, liked_file_ids=[ids["kettle.txt"]],
                      filters={"type": "eq", "key": "shelf", "value": "books"}).json()["data"]  # fmt: skip
    assert {by_id[item["file_id"]] for item in books} == {"saga.txt", "novel.txt"}


def test_bad_recommendation_requests_are_refused(
    http: TestClient, client: openai.OpenAI, shop: tuple[str, dict[str, str]]
) -> None:
    store_id, ids = shop
    other = _upload(client, "loose.txt", "not attached to the store")
    cases: list[tuple[dict[str, Any], int, str | None]] = [
        ({"liked_file_ids": [other]}, 400, "liked_file_ids"),
        ({"liked_file_ids": []}, 400, "liked_file_ids"),
        ({"liked_file_ids": [ids["tent.txt"]], "max_num_results": 0}, 400, "max_num_results"),
        ({"liked_file_ids": [ids["tent.txt"]], "filters": {"type": "eq", "key": "colour", "value": "red"}}, 400,
         "filters"),
        ({"liked_file_ids": [ids["tent.txt"]], "user": ""}, 400, "user"),
        ({}, 400, "liked_file_ids"),
        ({"user": "nobody"}, 400, "user"),  # rated nothing up
        ({"liked_file_ids": [ids["tent.txt"]], "users": ["u1"]}, 400, "users"),
    ]  # fmt: skip
    for body, status, param in cases:
        resp = recommend(http, store_id, **body)
        assert resp.status_code == status, (body, resp.text)
        assert resp.json()["error"]["param"] == param, body
    assert recommend(http, "vs_missing", liked_file_ids=[ids["tent.txt"]]).status_code == 404


def test_another_tenants_store_is_404(
    http: TestClient, shop: tuple[str, dict[str, str]], loaded_platform: Platform
) -> None:
    store_id, ids = shop
    loaded_platform.tenants.create("rival")
    _, secret = loaded_platform.keys.create("rival-app", tenant="rival", scopes=("inference", "files"))
    resp = http.post(
        f"/v1/vector_stores/{store_id}/recommendations",
        headers={"Authorization": f"Bearer {secret}"},
        json={"liked_file_ids": [ids["tent.txt"]]},
    )
    assert resp.status_code == 404 and resp.json()["error"]["type"] == "invalid_request_error"
    assert ids["tent.txt"] not in resp.text


def rate(http: TestClient, store_id: str, file_id: str, **body: Any) -> Any:
    return http.post(f"/v1/vector_stores/{store_id}/files/{file_id}/feedback", headers=AUTH, json=body)


def test_likes_come_from_users_ratings_of_items(http: TestClient, shop: tuple[str, dict[str, str]]) -> None:
    """A user's thumbs up are the likes, and every item they rated counts as seen: the same
    recommendations as those items given in the request."""
    store_id, ids = shop
    by_id = {file_id: name for name, file_id in ids.items()}

    def names(resp: Any) -> list[str]:
        assert resp.status_code == 200, resp.text
        return [by_id[item["file_id"]] for item in resp.json()["data"]]

    for name, rating in (("kettle.txt", "up"), ("saga.txt", "up"), ("mugs.txt", "down")):
        given = rate(http, store_id, ids[name], user="ann", rating=rating)
        assert given.status_code == 200, given.text
        assert given.json()["object"] == "vector_store.file.feedback" and given.json()["rating"] == rating
    rate(http, store_id, ids["tent.txt"], user="bob", rating="up")  # another user's taste is not ann's
    from_feedback = names(recommend(http, store_id, user="ann", max_num_results=50))
    given = names(recommend(http, store_id, liked_file_ids=[ids["kettle.txt"], ids["saga.txt"]],
                            exclude_file_ids=[ids["mugs.txt"]], max_num_results=50))  # fmt: skip
    assert from_feedback == given and len(given) == len(ITEMS) - 3

    assert rate(http, store_id, ids["saga.txt"], user="ann", rating="down").status_code == 200  # changed her mind
    changed = names(recommend(http, store_id, user="ann", max_num_results=50))
    seen = [ids["mugs.txt"], ids["saga.txt"]]
    assert changed == names(
        recommend(http, store_id, liked_file_ids=[ids["kettle.txt"]], exclude_file_ids=seen, max_num_results=50)
    )
    listed = http.get(f"/v1/vector_stores/{store_id}/feedback", headers=AUTH, params={"user": "ann"}).json()["data"]
    assert {(by_id[r["file_id"]], r["rating"]) for r in listed} == {
        ("kettle.txt", "up"),
        ("saga.txt", "down"),
        ("mugs.txt", "down"),
    }
    both = names(recommend(http, store_id, user="ann", liked_file_ids=[ids["tent.txt"]], max_num_results=50))
    assert "tent.txt" not in both and "saga.txt" not in both  # request likes join the user's


def test_bad_item_feedback_is_refused(
    http: TestClient, client: openai.OpenAI, shop: tuple[str, dict[str, str]], loaded_platform: Platform
) -> None:
    store_id, ids = shop
    loose = _upload(client, "loose.txt", "not attached to the store")
    cases: list[tuple[str, str, dict[str, Any], int, str | None]] = [
        (store_id, ids["tent.txt"], {"user": "ann", "rating": "meh"}, 400, "rating"),
        (store_id, ids["tent.txt"], {"user": "", "rating": "up"}, 400, "user"),
        (store_id, ids["tent.txt"], {"rating": "up"}, 400, "user"),
        (store_id, ids["tent.txt"], {"user": "ann", "rating": "up", "score": 5}, 400, "score"),
        (store_id, loose, {"user": "ann", "rating": "up"}, 404, "file_id"),
        ("vs_missing", ids["tent.txt"], {"user": "ann", "rating": "up"}, 404, None),
    ]
    for store, file_id, body, status, param in cases:
        resp = rate(http, store, file_id, **body)
        assert resp.status_code == status, (body, resp.text)
        if param is not None:
            assert resp.json()["error"]["param"] == param, body
    assert http.get(f"/v1/vector_stores/{store_id}/feedback", headers=AUTH, params={"user": "ann"}).json()["data"] == []
    loaded_platform.tenants.create("rival2")
    _, secret = loaded_platform.keys.create("rival2-app", tenant="rival2", scopes=("inference", "files"))
    other = {"Authorization": f"Bearer {secret}"}
    resp = http.post(f"/v1/vector_stores/{store_id}/files/{ids['tent.txt']}/feedback", headers=other,
                     json={"user": "ann", "rating": "up"})  # fmt: skip
    assert resp.status_code == 404
    assert http.get(f"/v1/vector_stores/{store_id}/feedback", headers=other, params={"user": "ann"}).status_code == 404
