"""Recommendations from a vector store whose files are items: a user's liked items averaged into
a profile (each item the mean of its chunks, so long items weigh no more than short ones), and the
store searched by that profile with the items already seen left out. Content-based: a new item is
recommended as soon as it is embedded, and nothing is trained."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmos.errors import InvalidRequestError
from llmos.retrieval.index import as_matrix
from llmos.retrieval.search import search_store
from llmos.retrieval.stores import VectorStores

CHUNKS_PER_ITEM = 4
"""Chunk hits asked for per item recommended: an item of several chunks may fill several hits."""


@dataclass(frozen=True)
class Recommendation:
    file_id: str
    filename: str
    attributes: dict[str, Any]
    score: float

    def public(self) -> dict[str, Any]:
        return {
            "object": "vector_store.recommendation",
            "file_id": self.file_id,
            "filename": self.filename,
            "attributes": self.attributes,
            "score": self.score,
        }


def profile(stores: VectorStores, store_id: str, liked: Sequence[str]) -> np.ndarray:
    """The unit mean of the liked items' unit vectors; 400 naming ``liked_file_ids`` for an item
    that is not a completed file of the store."""
    completed = {f.file_id for f in stores.files_of(store_id) if f.status == "completed"}
    for file_id in liked:
        if file_id not in completed:
            raise InvalidRequestError(
                f"{file_id[:64]!r} is not a processed file of vector store {store_id}", param="liked_file_ids"
            )
    embeddings = stores.embeddings(store_id, list(liked))
    by_file: dict[str, list[bytes]] = defaultdict(list)
    for chunk_id, chunk in stores.chunks(embeddings).items():
        by_file[chunk.file_id].append(embeddings[chunk_id])
    if not by_file:
        raise InvalidRequestError("the liked items hold no text to recommend from", param="liked_file_ids")
    items = as_matrix([as_matrix(vectors).mean(axis=0).tolist() for vectors in by_file.values()])
    return as_matrix([items.mean(axis=0).tolist()])[0]


def recommend(
    stores: VectorStores,
    store_id: str,
    liked: Sequence[str],
    *,
    exclude: Collection[str] = (),
    max_results: int = 10,
    flt: Mapping[str, Any] | None = None,
) -> list[Recommendation]:
    """The items nearest the profile of ``liked``, best first, neither liked nor in ``exclude``."""
    vector = profile(stores, store_id, liked)
    hits = search_store(
        stores,
        store_id,
        vector.tolist(),
        "",
        max_results=max_results * CHUNKS_PER_ITEM,
        flt=flt,
        exclude={*liked, *exclude},
    )
    best: dict[str, Recommendation] = {}
    for hit in hits:  # best first: an item's first hit is its best chunk
        if hit.file_id not in best:
            best[hit.file_id] = Recommendation(hit.file_id, hit.filename, hit.attributes, hit.score)
    return list(best.values())[:max_results]
