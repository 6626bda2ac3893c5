from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from llmos.errors import ArtifactError
from llmos.registry.store import LocalArtifactStore, safe_join


def test_put_file_names_blob_by_hash(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    src = tmp_path / "a.bin"
    src.write_bytes(b"hello")
    digest = store.put_file(src)
    assert digest == hashlib.sha256(b"hello").hexdigest()
    assert store.local_path(digest).read_bytes() == b"hello"
    assert store.exists(digest)


def _blob_files(store_root: Path) -> list[Path]:
    return [p for p in store_root.rglob("*") if p.is_file()]


def test_an_adopted_file_becomes_the_blob_without_a_copy(tmp_path: Path) -> None:
    """A checkpoint's file goes into a local store as a hard link: its bytes are on disk once."""
    store = LocalArtifactStore(tmp_path / "store")
    src = tmp_path / "trainable.safetensors"
    src.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    assert store.adopt_file(src, expected_sha256=digest) == digest
    blob = store.local_path(digest)
    assert (blob.stat().st_dev, blob.stat().st_ino) == (src.stat().st_dev, src.stat().st_ino)
    assert blob.read_bytes() == b"weights" and _blob_files(tmp_path / "store") == [blob]  # nothing left staged
    twin = tmp_path / "again.safetensors"  # the same bytes again: the blob there is kept
    twin.write_bytes(b"weights")
    assert store.adopt_file(twin, expected_sha256=digest) == digest
    assert store.local_path(digest).stat().st_ino == src.stat().st_ino and twin.stat().st_nlink == 1


def test_an_adopted_file_that_changed_since_it_was_hashed_is_refused(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    src = tmp_path / "trainer_state.json"
    src.write_bytes(b'{"step": 8}')
    with pytest.raises(ArtifactError, match="hash mismatch"):
        store.adopt_file(src, expected_sha256=hashlib.sha256(b'{"step": 4}').hexdigest())
    assert _blob_files(tmp_path / "store") == [] and src.stat().st_nlink == 1
    assert src.read_bytes() == b'{"step": 8}'


def test_a_file_that_cannot_be_linked_in_is_copied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    src = tmp_path / "optimizer.safetensors"
    src.write_bytes(b"moments")

    def other_filesystem(a: object, b: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", other_filesystem)
    digest = store.adopt_file(src, expected_sha256=hashlib.sha256(b"moments").hexdigest())
    blob = store.local_path(digest)
    assert blob.read_bytes() == b"moments" and blob.stat().st_ino != src.stat().st_ino
    assert _blob_files(tmp_path / "store") == [blob]


def test_hash_mismatch_leaves_nothing(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    with pytest.raises(ArtifactError, match="hash mismatch"):
        store.put_chunks([b"abc"], expected_sha256="0" * 64)
    assert not any(p.is_file() for p in (tmp_path / "store").rglob("*"))


def test_interrupted_write_leaves_no_partial_blob(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")

    def broken() -> object:
        yield b"part"
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.put_chunks(broken())  # type: ignore[arg-type]
    assert not any(p.is_file() for p in (tmp_path / "store").rglob("*"))


@pytest.mark.parametrize("digest", ["../../etc/passwd", "%2e%2e%2f", "..\\x", "/abs", "A" * 64, "a" * 63, "\x00"])
def test_bad_digests_are_refused(tmp_path: Path, digest: str) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    with pytest.raises(ArtifactError):
        store.local_path(digest)


def test_planted_symlink_is_refused(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    digest = hashlib.sha256(b"x").hexdigest()
    target = tmp_path / "secret"
    target.write_text("secret")
    (tmp_path / "store" / "sha256" / digest[:2]).mkdir(parents=True)
    os.symlink(target, tmp_path / "store" / "sha256" / digest[:2] / digest)
    with pytest.raises(ArtifactError, match="symbolic link"):
        store.local_path(digest)


@pytest.mark.parametrize("rel", ["../x", "a/../../x", "/etc/passwd", "a\\..\\b", "a\x00b", ""])
def test_safe_join_refuses_escapes(tmp_path: Path, rel: str) -> None:
    with pytest.raises(ArtifactError):
        safe_join(tmp_path, rel)


def test_safe_join_allows_nested(tmp_path: Path) -> None:
    assert safe_join(tmp_path, "1_Pooling/config.json") == (tmp_path / "1_Pooling" / "config.json").resolve()
