"""Search of vector stores: nearest chunks by embedding, optionally fused with BM25 by weighted
reciprocal-rank fusion (OpenAI's ``ranking_options.hybrid_search``), filtered by file
attributes, cut at ``score_threshold``."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmos.registry.vector_tables import VectorChunkRow, VectorStoreFileRow
from llmos.retrieval.filters import matches
from llmos.retrieval.index import as_matrix
from llmos.retrieval.stores import VectorStores

RRF_K = 60
"""The usual constant of reciprocal-rank fusion (Cormack et al., 2009)."""
MIN_CANDIDATES = 50


@dataclass(frozen=True)
class Hybrid:
    embedding_weight: float = 1.0
    text_weight: float = 1.0


@dataclass(frozen=True)
class SearchHit:
    vector_store_id: str
    file_id: str
    filename: str
    attributes: dict[str, Any]
    text: str
    score: float

    def public(self) -> dict[str, Any]:
        """OpenAI's search result (one chunk as the result's content)."""
        return {
            "file_id": self.file_id,
            "filename": self.filename,
            "score": self.score,
            "attributes": self.attributes,
            "content": [{"type": "text", "text": self.text}],
        }


def search_store(
    stores: VectorStores,
    store_id: str,
    query_vector: list[float],
    query_text: str,
    *,
    max_results: int,
    flt: Mapping[str, Any] | None = None,
    score_threshold: float = 0.0,
    hybrid: Hybrid | None = None,
    exclude: Collection[str] = (),
) -> list[SearchHit]:
    """The best chunks, of completed files passing ``flt`` and not in ``exclude`` (file ids)."""
    files = {
        f.file_id: f
        for f in stores.files_of(store_id)
        if f.status == "completed" and f.file_id not in exclude and (flt is None or matches(flt, f.attributes or {}))
    }
    if not files:
        return []
    query = as_matrix([query_vector])[0]
    depth = max(MIN_CANDIDATES, 4 * max_results)
    # Filtered: exact over the files that pass (an HNSW walk would miss matches behind filtered ones).
    narrowed = flt is not None or bool(exclude)
    exact = _exact(stores.embeddings(store_id, list(files)), query, depth) if narrowed else None
    similar, keyword_ids = stores.nearest(
        store_id, None if exact is not None else query, depth, query_text if hybrid is not None else None, depth * 4
    )
    similar = exact if exact is not None else similar
    chunks = stores.chunks({k for k, _ in similar} | set(keyword_ids))
    chunks = {k: c for k, c in chunks.items() if c.file_id in files}
    keyword_ids = [k for k in keyword_ids if k in chunks][:depth]
    similarity = {k: s for k, s in similar if k in chunks}
    scores = similarity if hybrid is None else _fused(list(similarity), keyword_ids, hybrid)
    hits = [_hit(store_id, chunks[k], files[chunks[k].file_id], s) for k, s in scores.items() if s >= score_threshold]
    hits.sort(key=lambda h: -h.score)
    return hits[:max_results]


def _exact(candidates: dict[int, bytes], query: np.ndarray, depth: int) -> list[tuple[int, float]]:
    if not candidates:
        return []
    keys = list(candidates)
    scores = as_matrix(list(candidates.values())) @ query
    best = np.argsort(-scores)[:depth]
    return [(keys[i], float(scores[i])) for i in best]


def _fused(by_vector: list[int], by_keyword: list[int], hybrid: Hybrid) -> dict[int, float]:
    """Weighted reciprocal-rank fusion, scaled so that a chunk first in both lists scores 1."""
    total = hybrid.embedding_weight + hybrid.text_weight
    scale = (RRF_K + 1) / total if total > 0 else 0.0
    fused: dict[int, float] = {}
    for weight, ranking in ((hybrid.embedding_weight, by_vector), (hybrid.text_weight, by_keyword)):
        for rank, key in enumerate(ranking, start=1):
            fused[key] = fused.get(key, 0.0) + weight / (RRF_K + rank) * scale
    return fused


def _hit(store_id: str, chunk: VectorChunkRow, file: VectorStoreFileRow, score: float) -> SearchHit:
    return SearchHit(
        vector_store_id=store_id,
        file_id=file.file_id,
        filename=file.filename,
        attributes=dict(file.attributes or {}),
        text=chunk.text,
        score=round(score, 6),
    )
