"""Blob collection across servers: two platforms on one PostgreSQL database and one bucket (moto's
S3 server), each with a local directory of its own as two machines have. A collection on one waits
while the other places a blob and writes its reference, and the reverse; two never collect at once."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("boto3")
pytest.importorskip("moto.server")

from llmos.config import Settings
from llmos.platform import Platform
from llmos.registry import files as files_module
from llmos.registry import gc as gc_module
from llmos.registry.gc import collect_garbage
from llmos.registry.object_store import S3ArtifactStore
from tests.postgres import postgres_server
from tests.unit.test_object_store import BUCKET, bucket, s3_endpoint  # noqa: F401

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
DATA = (json.dumps(CHAT) + "\n").encode()
WAITS = 0.5
"""How long a blocked thread is watched to still be blocked (it would be done in milliseconds)."""


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture
def servers(tmp_path: Path, pg_url: str, s3_endpoint: str, bucket: object) -> Iterator[tuple[Platform, Platform]]:  # noqa: F811
    opened = [
        Platform.open(
            Settings(
                home=tmp_path / name,
                database_url=pg_url,
                artifact_store=f"s3://{BUCKET}/shared",
                s3_endpoint_url=s3_endpoint,
            )
        )
        for name in ("first", "second")
    ]
    yield opened[0], opened[1]
    for platform in opened:
        platform.close()


def upload(platform: Platform, tenant: str) -> Any:
    record, _ = platform.files.create(
        tenant=tenant, purpose="fine-tune", filename="t.jsonl", chunks=[DATA], max_bytes=1 << 20
    )
    return record


def _paused(real: Callable[..., Any], reached: threading.Event, proceed: threading.Event, thread: str) -> Any:
    """``real``, held at its start when called on the thread named ``thread``."""

    def held(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == thread:
            reached.set()
            assert proceed.wait(30)
        return real(*args, **kwargs)

    return held


def test_a_delete_on_one_server_waits_for_an_upload_on_the_other(
    servers: tuple[Platform, Platform], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = servers
    theirs = upload(second, "bob")
    placed, proceed = threading.Event(), threading.Event()
    # Alice's upload on the first server has claimed the shared blob; her row is not written yet.
    monkeypatch.setattr(files_module, "insert_once", _paused(files_module.insert_once, placed, proceed, "alice"))
    result: list[Any] = []
    alice = threading.Thread(target=lambda: result.append(upload(first, "alice")), name="alice")
    alice.start()
    assert placed.wait(30)
    bob = threading.Thread(target=second.files.delete, args=("bob", theirs.id), name="bob")
    bob.start()
    try:
        bob.join(WAITS)
        assert bob.is_alive()  # the second server's collection waits for the first server's reference
    finally:
        proceed.set()
        alice.join()
    bob.join()
    assert first.files.content_path("alice", result[0].id).read_bytes() == DATA
    store = second.registry.store
    assert isinstance(store, S3ArtifactStore)
    store.cache.discard(result[0].sha256)
    assert second.files.content_path("alice", result[0].id).read_bytes() == DATA  # still in the bucket


def test_two_servers_never_collect_at_once_and_writes_wait_for_a_collection(
    servers: tuple[Platform, Platform], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = servers
    orphan = first.registry.store.put_chunks([b"left behind by a crash"])
    deciding, proceed = threading.Event(), threading.Event()
    # The first server's sweep has the lock and is deciding what is unreferenced.
    monkeypatch.setattr(gc_module, "referenced", _paused(gc_module.referenced, deciding, proceed, "sweep"))
    # Everything stored so far is past its grace period; the upload below stages its bytes later.
    cutoff = time.time()
    swept: list[int] = []

    def sweep(platform: Platform) -> None:
        swept.append(collect_garbage(platform.db, platform.registry.store, grace_s=0, now=cutoff).blobs)

    first_sweep = threading.Thread(target=sweep, args=(first,), name="sweep")
    first_sweep.start()
    assert deciding.wait(30)
    second_sweep = threading.Thread(target=sweep, args=(second,))
    uploaded: list[Any] = []
    writer = threading.Thread(target=lambda: uploaded.append(upload(second, "carol")))
    second_sweep.start()
    writer.start()
    try:
        second_sweep.join(WAITS)
        writer.join(0)
        assert second_sweep.is_alive() and writer.is_alive()  # both wait for the first server's sweep
        assert second.files.list("carol") == ([], False)
    finally:
        proceed.set()
        first_sweep.join()
    second_sweep.join()
    writer.join()
    assert sorted(swept) == [0, 1]  # the orphan was collected once, by whichever swept first
    assert not first.registry.store.exists(orphan)
    assert second.files.content_path("carol", uploaded[0].id).read_bytes() == DATA
