"""Nothing orphaned: failed uploads leave no blob, shared blobs survive one tenant's delete while
another's upload is in flight, errors say nothing of other tenants' content, and the periodic
collector removes unreferenced blobs only after their grace period (its clock injected)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from llmos.errors import ConflictError, InvalidRequestError, PermissionDeniedError
from llmos.platform import Platform
from llmos.registry import files as files_module
from llmos.registry.files import FileStore
from llmos.registry.gc import collect_garbage
from llmos.registry.tables import BlobClaimRow
from llmos.training.datasets import check_training_file

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
DATA = (json.dumps(CHAT) + "\n").encode()


def blobs(platform: Platform) -> list[Path]:
    return [p for p in (platform.settings.store_dir / "sha256").rglob("*") if p.is_file()]


def staged(platform: Platform) -> list[Path]:
    return list((platform.settings.store_dir / "tmp").iterdir())


def upload(files: FileStore, tenant: str, data: bytes = DATA, **kwargs: Any) -> Any:
    record, _ = files.create(
        tenant=tenant, purpose="fine-tune", filename="t.jsonl", chunks=[data], max_bytes=1 << 20, **kwargs
    )
    return record


def test_idempotency_conflict_leaves_no_blob(platform: Platform) -> None:
    first = upload(platform.files, "acme", idempotency_key="k")
    with pytest.raises(ConflictError):
        upload(platform.files, "acme", DATA * 2, idempotency_key="k")
    assert blobs(platform) == [platform.files.content_path("acme", first.id)]
    assert staged(platform) == []


def test_validator_crash_leaves_no_blob(platform: Platform) -> None:
    def crash(path: Path) -> dict[str, Any]:
        raise RecursionError("maximum recursion depth exceeded")

    files = FileStore(platform.db, platform.registry.store, {"fine-tune": crash})
    with pytest.raises(RecursionError):
        upload(files, "acme")
    assert blobs(platform) == [] and staged(platform) == []
    assert files.list("acme") == ([], False)


def test_quota_refusal_leaves_no_blob_and_says_nothing_of_other_tenants(platform: Platform) -> None:
    upload(platform.files, "other")  # another tenant holds this very content
    files = FileStore(platform.db, platform.registry.store, {"fine-tune": check_training_file}, quota=lambda t: 10)
    errors = []
    for data in (DATA, DATA.replace(b"hello", b"howdy")):  # same length; held by "other" / by nobody
        with pytest.raises(PermissionDeniedError) as exc:
            upload(files, "acme", data)
        errors.append(exc.value.to_dict())
    assert errors[0] == errors[1]
    assert errors[0]["error"]["code"] == "storage_quota_exceeded"
    assert len(blobs(platform)) == 1 and staged(platform) == []


def test_quota_counts_files_whole_and_frees_on_delete(platform: Platform) -> None:
    files = FileStore(
        platform.db, platform.registry.store, {"fine-tune": check_training_file}, quota=lambda t: 2 * len(DATA)
    )
    first = upload(files, "acme")
    upload(files, "acme")  # the same content twice still counts twice
    with pytest.raises(PermissionDeniedError):
        upload(files, "acme")
    files.delete("acme", first.id)
    upload(files, "acme")


def test_a_tenant_deleting_its_copy_never_breaks_an_upload_in_flight(platform: Platform) -> None:
    theirs = upload(platform.files, "bob")

    def validate_while_bob_deletes(path: Path) -> dict[str, Any]:
        platform.files.delete("bob", theirs.id)  # the last reference to the shared blob goes mid-upload
        return check_training_file(path)

    files = FileStore(platform.db, platform.registry.store, {"fine-tune": validate_while_bob_deletes})
    mine = upload(files, "alice")
    assert mine.status == "processed"
    assert platform.files.content_path("alice", mine.id).read_bytes() == DATA


def test_a_delete_waits_while_an_upload_places_its_blob_and_row(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs = upload(platform.files, "bob")
    placed, proceed = threading.Event(), threading.Event()
    real_insert = files_module.insert_once

    def paused_insert(*args: Any, **kwargs: Any) -> Any:
        placed.set()  # alice's blob is placed (bob's was there: only claimed); her row is not yet written
        proceed.wait()
        return real_insert(*args, **kwargs)

    monkeypatch.setattr(files_module, "insert_once", paused_insert)
    result: list[Any] = []
    alice = threading.Thread(target=lambda: result.append(upload(platform.files, "alice")))
    alice.start()
    assert placed.wait(30)
    bob = threading.Thread(target=platform.files.delete, args=("bob", theirs.id))
    bob.start()
    try:
        bob.join(0.3)
        assert bob.is_alive()  # bob's collection waits for alice's reference: it cannot take the blob from her
    finally:
        proceed.set()
        alice.join()
    bob.join()
    assert platform.files.content_path("alice", result[0].id).read_bytes() == DATA


def test_invalid_content_keeps_only_the_file_it_is_reported_on(platform: Platform) -> None:
    with pytest.raises(InvalidRequestError):
        platform.files.create(tenant="acme", purpose="nope", filename="x", chunks=[DATA], max_bytes=1 << 20)
    bad = upload(platform.files, "acme", b"{oops\n")
    assert bad.status == "error"
    platform.files.delete("acme", bad.id)
    assert blobs(platform) == [] and staged(platform) == []


def test_collector_removes_unreferenced_blobs_after_the_grace_period(platform: Platform) -> None:
    store = platform.registry.store
    kept = upload(platform.files, "acme")
    orphan = store.put_chunks([b"left behind by a crash"])
    abandoned = store.stage([b"a write that never finished"])
    placed = store.local_path(orphan).stat().st_mtime
    for path in (store.local_path(orphan), store.local_path(kept.sha256), abandoned.path):
        os.utime(path, (placed, placed))

    early = collect_garbage(platform.db, store, grace_s=3600, now=placed + 3599)
    assert (early.blobs, early.staged_files) == (0, 0)
    assert store.exists(orphan) and abandoned.path.exists()

    late = collect_garbage(platform.db, store, grace_s=3600, now=placed + 3601)
    assert (late.blobs, late.staged_files) == (1, 1)
    assert not store.exists(orphan) and not abandoned.path.exists()
    assert platform.files.content_path("acme", kept.id).read_bytes() == DATA  # referenced: never collected


def test_claiming_an_existing_blob_restarts_its_grace_period(platform: Platform) -> None:
    store = platform.registry.store
    digest = store.put_chunks([b"pulled earlier"])
    os.utime(store.local_path(digest), (1_000_000, 1_000_000))
    store.put_chunks([b"pulled earlier"])  # a writer about to refer to it claims it again
    assert collect_garbage(platform.db, store, grace_s=3600, now=1_000_000 + 7200).blobs == 0
    assert store.exists(digest)


def test_a_failed_pull_keeps_a_blob_an_upload_claimed_meanwhile(
    platform: Platform, tiny_chat_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = (tiny_chat_dir / "config.json").read_bytes()
    uploaded: list[Any] = []

    def upload_then_fail(*args: Any, **kwargs: Any) -> Any:
        uploaded.append(upload(platform.files, "acme", config))  # identical to a file the pull just stored
        raise RuntimeError("the pull fails before it records the model")

    monkeypatch.setattr(platform.registry, "_insert", upload_then_fail)
    with pytest.raises(RuntimeError):
        platform.registry.pull(f"file:{tiny_chat_dir}", name="chat")
    assert platform.files.content_path("acme", uploaded[0].id).read_bytes() == config
    assert len(blobs(platform)) == 1  # the pull's other blobs went


def test_a_delete_never_takes_a_blob_a_pull_in_flight_found_stored(
    platform: Platform, tiny_chat_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    platform.registry.pull(f"file:{tiny_chat_dir}", name="chat")
    real_insert = platform.registry._insert

    def delete_the_other_then_insert(*args: Any, **kwargs: Any) -> Any:
        platform.registry.delete("chat")  # the last reference of every blob the pull found stored goes
        return real_insert(*args, **kwargs)

    monkeypatch.setattr(platform.registry, "_insert", delete_the_other_then_insert)
    copy = platform.registry.pull(f"file:{tiny_chat_dir}", name="copy")
    assert all(platform.registry.store.exists(digest) for digest in copy.artifacts.values())
    with platform.db.session() as s:
        assert s.scalars(select(BlobClaimRow)).all() == []  # the pull's claims went with it
