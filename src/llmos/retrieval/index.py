"""A vector store's two indexes under ``$LLMOS_HOME/vector_stores/<id>/``: an exact index of its
chunks' embeddings (FAISS, ADR 0015) and a BM25 keyword index (SQLite FTS5). Both are caches
of the chunks in the database: missing, unreadable or out of step with it, they are rebuilt."""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

log = logging.getLogger(__name__)
_WORD = re.compile(r"\w+", re.UNICODE)
MAX_QUERY_TERMS = 64


def as_matrix(vectors: Sequence[Sequence[float]] | Sequence[bytes]) -> np.ndarray:
    """Rows of float32, each scaled to unit length (cosine similarity is then a dot product)."""
    if vectors and isinstance(vectors[0], bytes):
        matrix = np.stack([np.frombuffer(v, dtype="<f4") for v in vectors])  # type: ignore[arg-type]
    else:
        matrix = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.where(norms == 0, 1.0, norms)).astype(np.float32)


class VectorIndex:
    """Exact inner-product index of unit vectors (cosine similarity) keyed by chunk id, saved
    after every change (FAISS ``IndexFlatIP`` in an ``IndexIDMap2``: it removes ids, which FAISS's
    HNSW cannot; ADR 0015)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.index: Any = None
        if path.exists():
            try:
                self.index = faiss.read_index(str(path))
            except Exception:  # a damaged file is only a cache: rebuilt by the caller
                log.warning("vector index %s unreadable; it will be rebuilt", path)
                self.index = None

    def __len__(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def add(self, keys: Sequence[int], matrix: np.ndarray) -> None:
        if not keys:
            return
        if self.index is None:
            self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(matrix.shape[1]))
        self.index.add_with_ids(np.ascontiguousarray(matrix, dtype=np.float32), np.asarray(keys, dtype=np.int64))

    def remove(self, keys: Sequence[int]) -> None:
        if self.index is not None and keys:
            self.index.remove_ids(np.asarray(keys, dtype=np.int64))

    def search(self, query: np.ndarray, count: int) -> list[tuple[int, float]]:
        """The ``count`` nearest chunks: (chunk id, cosine similarity), best first."""
        if self.index is None or self.index.ntotal == 0:
            return []
        rows = np.ascontiguousarray(np.asarray(query, dtype=np.float32).reshape(1, -1))
        scores, ids = self.index.search(rows, min(count, int(self.index.ntotal)))
        return [(int(k), float(d)) for k, d in zip(ids[0], scores[0], strict=True) if k >= 0]

    def save(self) -> None:
        if self.index is None:
            return
        staged = self.path.with_suffix(".tmp")
        faiss.write_index(self.index, str(staged))
        staged.replace(self.path)  # a crash leaves the old file or the new one, never half of one


class KeywordIndex:
    """BM25 over chunk texts (FTS5, Porter stemming), keyed by chunk id."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = sqlite3.connect(path, check_same_thread=False)
        self.conn.execute("CREATE VIRTUAL TABLE IF NOT EXISTS chunks USING fts5(text, tokenize='porter unicode61')")

    def __len__(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM chunks").fetchone()[0])

    def add(self, keys: Sequence[int], texts: Sequence[str]) -> None:
        with self.conn:
            self.conn.executemany("INSERT INTO chunks(rowid, text) VALUES (?, ?)", zip(keys, texts, strict=True))

    def remove(self, keys: Sequence[int]) -> None:
        with self.conn:
            self.conn.executemany("DELETE FROM chunks WHERE rowid = ?", [(k,) for k in keys])

    def search(self, query: str, count: int) -> list[int]:
        """Chunk ids by BM25, best first; any word of the query may match."""
        terms = list(dict.fromkeys(w.lower() for w in _WORD.findall(query)))[:MAX_QUERY_TERMS]
        if not terms:
            return []
        expression = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
        rows = self.conn.execute(
            "SELECT rowid FROM chunks WHERE chunks MATCH ? ORDER BY bm25(chunks) LIMIT ?", (expression, count)
        )
        return [int(r[0]) for r in rows]

    def close(self) -> None:
        self.conn.close()


class StoreIndexes:
    """Both indexes of one vector store."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.vectors = VectorIndex(directory / "vectors.faiss")
        try:
            self.keywords = KeywordIndex(directory / "keywords.sqlite")
        except sqlite3.DatabaseError:
            log.warning("keyword index in %s unreadable; it will be rebuilt", directory)
            (directory / "keywords.sqlite").unlink(missing_ok=True)
            self.keywords = KeywordIndex(directory / "keywords.sqlite")

    def intact(self) -> bool:
        """Both files still on disk (one deleted by hand must be rebuilt, not silently kept in memory)."""
        return self.keywords.path.exists() and (self.vectors.index is None or self.vectors.path.exists())

    def in_step(self, chunk_count: int) -> bool:
        return len(self.vectors) == chunk_count and len(self.keywords) == chunk_count

    def add(self, keys: Sequence[int], texts: Sequence[str], matrix: np.ndarray) -> None:
        self.vectors.add(keys, matrix)
        self.keywords.add(keys, texts)
        self.vectors.save()

    def remove(self, keys: Sequence[int]) -> None:
        self.vectors.remove(keys)
        self.keywords.remove(keys)
        self.vectors.save()

    def close(self) -> None:
        self.keywords.close()

    def destroy(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.directory)


def rebuilt(directory: Path, keys: Sequence[int], texts: Sequence[str], embeddings: Sequence[bytes]) -> StoreIndexes:
    """Fresh indexes of ``directory`` holding exactly the given chunks."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(directory)
    indexes = StoreIndexes(directory)
    if keys:
        indexes.add(keys, texts, as_matrix(embeddings))
    return indexes
