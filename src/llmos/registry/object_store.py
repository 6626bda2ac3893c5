"""Blobs in an S3-compatible bucket (``artifact_store = "s3://bucket/prefix"``), read through a
bounded local cache.

Objects are named as in the local store (``<prefix>/sha256/<first two hex digits>/<digest>``), so
a bucket can be filled by copying a local store's ``sha256`` directory. A blob read from the bucket
is hashed while it is downloaded and kept only if its digest matches its name; the local copies
are a cache of at most ``s3_cache_mb``, the least recently used evicted first. Writes are staged
and hashed locally first (``ArtifactStore.stage``), uploaded, and the staged file then becomes
the cached copy, so what was just written is never downloaded again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from llmos.errors import ArtifactError, InvalidRequestError, ServiceUnavailableError
from llmos.registry.store import CHUNK, ArtifactStore, LocalArtifactStore, StagedBlob, check_digest


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix/")``."""
    parts = urlsplit(uri)
    bucket, prefix = parts.netloc, parts.path.strip("/")
    if parts.scheme != "s3" or not bucket or parts.query or parts.fragment:
        raise InvalidRequestError(f"artifact_store {uri!r} is not an s3://bucket/prefix URI", param="artifact_store")
    return bucket, f"{prefix}/" if prefix else ""


class BlobCache:
    """Verified local copies of remote blobs, at most ``max_bytes`` of them (LRU by last use)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._incoming = root / "incoming"
        self._incoming.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def path(self, digest: str) -> Path:
        return self.root / check_digest(digest)[:2] / digest

    def get(self, digest: str) -> Path | None:
        """The cached copy, marked as just used; None when it is not cached."""
        path = self.path(digest)
        try:
            os.utime(path)  # the mtime orders eviction (atime is unreliable on relatime mounts)
        except FileNotFoundError:
            return None
        return path

    def admit(self, src: Path, digest: str) -> Path:
        """Move a verified file into the cache (consuming it) and evict down to the bound."""
        path = self.path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, path)
        self._evict(keep=path)
        return path

    def incoming(self) -> tuple[int, Path]:
        """A private temporary file for a download in progress."""
        fd, name = tempfile.mkstemp(dir=self._incoming, prefix="get-")
        return fd, Path(name)

    def discard(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def _evict(self, keep: Path) -> None:
        with self._lock:
            entries = []
            for path in self.root.glob("??/*"):
                with contextlib.suppress(FileNotFoundError):
                    stat = path.stat()
                    entries.append((stat.st_mtime, stat.st_size, path))
            total = sum(size for _, size, _ in entries)
            for _, size, path in sorted(entries):
                if total <= self.max_bytes:
                    break
                if path != keep:  # the file a reader is about to open stays, even if alone over the bound
                    path.unlink(missing_ok=True)  # a loader's hard link or open handle keeps its bytes
                    total -= size


class S3ArtifactStore(ArtifactStore):
    """An S3-compatible bucket through boto3 (``pip install "llmos[s3]"``); credentials come from
    boto3's usual chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile, an instance role)."""

    def __init__(self, uri: str, *, local_root: Path, cache_bytes: int, endpoint_url: str | None = None) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:  # the extra is optional: say what to install
            raise InvalidRequestError(
                'artifact_store is an s3:// URI but boto3 is not installed: pip install "llmos[s3]"',
                param="artifact_store",
            ) from exc
        self.bucket, self.prefix = parse_s3_uri(uri)
        retries = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=60)
        self._client: Any = boto3.client("s3", endpoint_url=endpoint_url or None, config=retries)
        self.cache = BlobCache(local_root / "cache", cache_bytes)
        super().__init__(staging=local_root / "tmp", lock=local_root / "lock")

    def _key(self, digest: str) -> str:
        return f"{self.prefix}sha256/{check_digest(digest)[:2]}/{digest}"

    @contextlib.contextmanager
    def _remote(self, action: str) -> Iterator[None]:
        """Errors of the object store as the platform's: a missing object is a missing blob, the
        rest (unreachable endpoint, denied credentials) a 503 naming the bucket, not the secret."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                raise ArtifactError(
                    f"{action}: the blob is missing from the object store", code="artifact_missing"
                ) from exc
            raise ServiceUnavailableError(
                f"{action}: object store s3://{self.bucket} answered {code or 'an error'}", code="storage_unavailable"
            ) from exc
        except BotoCoreError as exc:
            raise ServiceUnavailableError(
                f"{action}: object store s3://{self.bucket} is unreachable ({type(exc).__name__})",
                code="storage_unavailable",
            ) from exc

    def _stored(self, digest: str) -> bool:
        try:
            with self._remote(f"checking blob {digest}"):
                self._client.head_object(Bucket=self.bucket, Key=self._key(digest))
        except ArtifactError:
            return False
        return True

    def place(self, staged: StagedBlob) -> bool:
        key = self._key(staged.digest)
        if self._stored(staged.digest):
            # S3 cannot touch an object: copying it onto itself with new metadata renews its
            # LastModified, which a collector's grace period counts from (objects up to 5 GB).
            with self._remote(f"claiming blob {staged.digest}"):
                self._client.copy_object(
                    Bucket=self.bucket,
                    Key=key,
                    CopySource={"Bucket": self.bucket, "Key": key},
                    Metadata={"claimed": str(time.time())},
                    MetadataDirective="REPLACE",
                )
            return False
        with self._remote(f"uploading blob {staged.digest}"):
            self._client.upload_file(str(staged.path), self.bucket, key)
        self.cache.admit(staged.path, staged.digest)
        return True

    def blobs(self) -> Iterator[tuple[str, float]]:
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}sha256/"
        )
        with self._remote("listing blobs"):
            for page in pages:
                for obj in page.get("Contents", []):
                    digest = obj["Key"].rsplit("/", 1)[-1]
                    with contextlib.suppress(ArtifactError):
                        if check_digest(digest) and obj["Key"] == self._key(digest):
                            yield digest, obj["LastModified"].timestamp()

    def exists(self, digest: str) -> bool:
        return self.cache.get(digest) is not None or self._stored(digest)

    def local_path(self, digest: str) -> Path:
        cached = self.cache.get(digest)
        if cached is not None:
            return cached
        fd, tmp = self.cache.incoming()
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, self._remote(f"reading blob {digest}"):
                body = self._client.get_object(Bucket=self.bucket, Key=self._key(digest))["Body"]
                for chunk in body.iter_chunks(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != digest:
                raise ArtifactError(
                    f"blob {digest} in s3://{self.bucket} is corrupt: its content hashes to {h.hexdigest()}",
                    code="hash_mismatch",
                )
            return self.cache.admit(tmp, digest)
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, digest: str) -> None:
        with self._remote(f"deleting blob {digest}"):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(digest))
        self.cache.discard(digest)


def open_artifact_store(
    uri: str, *, local_root: Path, cache_bytes: int, endpoint_url: str | None = None
) -> ArtifactStore:
    """The store a setting names: empty for the local directory ``local_root``, or ``s3://...``."""
    if not uri:
        return LocalArtifactStore(local_root)
    return S3ArtifactStore(uri, local_root=local_root, cache_bytes=cache_bytes, endpoint_url=endpoint_url)
