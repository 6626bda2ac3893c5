"""Processing of attached files off the request path: text, chunks, embeddings, indexes; the
file ends ``completed`` or ``failed`` with OpenAI's ``last_error``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from llmos.errors import LLMOSError, NotFoundError
from llmos.registry.files import FileStore
from llmos.retrieval.chunking import StaticChunking
from llmos.retrieval.documents import DocumentError, document_text
from llmos.retrieval.stores import VectorStores

log = logging.getLogger(__name__)

Embed = Callable[[str, list[str]], Awaitable[list[list[float]]]]
"""Vectors of texts by an embedding model (the engine's embedding path, charged to the tenant)."""
EMBED_BATCH = 32
FILES_AT_ONCE = 4
"""Files processed at once: a batch of hundreds must not fill the engine's queue, where
clients' requests would be refused."""


@dataclass(frozen=True)
class FileJob:
    tenant: str
    vector_store_id: str
    file_id: str
    filename: str
    chunking: StaticChunking
    embedding_model: str


class Ingestion:
    """The files being processed; each is one task on the server's event loop (its blocking
    parts in threads)."""

    def __init__(self, stores: VectorStores, files: FileStore) -> None:
        self.stores = stores
        self.files = files
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(FILES_AT_ONCE)

    def submit(self, job: FileJob, embed: Embed) -> None:
        task = asyncio.get_running_loop().create_task(self.process(job, embed))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def process(self, job: FileJob, embed: Embed) -> None:
        async with self._slots:
            await self._process(job, embed)

    async def _process(self, job: FileJob, embed: Embed) -> None:
        try:
            path = await asyncio.to_thread(self.files.content_path, job.tenant, job.file_id)
            text = await asyncio.to_thread(document_text, path, job.filename)
            chunks = job.chunking.split(text)
            vectors: list[list[float]] = []
            for start in range(0, len(chunks), EMBED_BATCH):
                vectors += await embed(job.embedding_model, chunks[start : start + EMBED_BATCH])
            await asyncio.to_thread(self.stores.complete, job.vector_store_id, job.file_id, chunks, vectors)
        except DocumentError as exc:
            await asyncio.to_thread(self.stores.fail, job.vector_store_id, job.file_id, exc.code, exc.message)
        except NotFoundError:
            await asyncio.to_thread(
                self.stores.fail, job.vector_store_id, job.file_id, "invalid_file", "the file was deleted"
            )
        except LLMOSError as exc:  # the embedding model gone, the engine failing: the file can be attached again
            await asyncio.to_thread(self.stores.fail, job.vector_store_id, job.file_id, "server_error", exc.message)
        except Exception as exc:
            log.exception("processing %s for %s failed", job.file_id, job.vector_store_id)
            await asyncio.to_thread(
                self.stores.fail, job.vector_store_id, job.file_id, "server_error", f"processing failed: {exc}"[:500]
            )

    async def wait(self) -> None:
        """Until every file submitted so far is processed."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
