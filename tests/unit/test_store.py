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
