"""Content-addressed artifact store.

Blobs are named by their sha256. A blob is written to a temporary file inside the store,
hashed while it is written, and renamed into place only after its hash checks, so a crash,
a full disk or a corrupt download never leaves a partial blob under a real name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

from llmos.errors import ArtifactError, InsufficientStorageError

CHUNK = 1024 * 1024
_DIGEST = re.compile(r"^[0-9a-f]{64}$")

ProgressFn = Callable[[int], None]
"""Called with the number of bytes just processed."""


class ClusterLock(Protocol):
    """A lock held across machines: many holders at once when ``shared``, else one alone."""

    def __call__(self, *, shared: bool) -> AbstractContextManager[None]: ...


@contextmanager
def _machine_only(*, shared: bool) -> Iterator[None]:
    """No other machine writes these blobs: the machine's own lock is all there is to hold."""
    yield


@dataclass(frozen=True)
class StagedBlob:
    """Bytes written and hashed but not yet stored under their name."""

    path: Path
    digest: str
    size: int

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def check_digest(digest: str) -> str:
    if not _DIGEST.fullmatch(digest):
        raise ArtifactError(f"not a sha256 hex digest: {digest[:80]!r}", param="sha256")
    return digest


def sha256_file(path: Path, progress: ProgressFn | None = None) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


class ArtifactStore(ABC):
    """Where model and dataset bytes live; chosen by URI (a local directory by default, or an
    S3-compatible bucket: ``registry.object_store``). Every write is staged in a private local
    file, hashed on the way, and only then placed under its name; where blobs then live is the
    subclass's business."""

    adopts_in_place: ClassVar[bool] = False
    """Whether ``adopt_file`` makes the blob the adopted file itself (a local store's hard link):
    damage to that file where it lies is then damage to the blob, which only a reader checking
    the content against the digest it expects finds."""

    def __init__(self, staging: Path, lock: Path) -> None:
        self._tmp = staging
        self._lock_dir = lock
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._lock_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # not re-entrant: a second flock in one process would wait forever
        self._cluster_lock: ClusterLock = _machine_only

    @abstractmethod
    def place(self, staged: StagedBlob) -> bool:
        """Store a staged blob under its name (call inside ``placing``); the staged file is
        consumed or left for ``discard``. An existing blob of that name is kept and its time
        refreshed, so a collector's grace period counts from this claim. True if it is new."""

    @abstractmethod
    def blobs(self) -> Iterator[tuple[str, float]]:
        """(digest, time last placed or claimed, epoch seconds) of every blob."""

    @abstractmethod
    def exists(self, digest: str) -> bool: ...

    @abstractmethod
    def local_path(self, digest: str) -> Path:
        """A local file holding the blob (for loaders that need a path)."""

    @abstractmethod
    def delete(self, digest: str) -> None: ...

    def put_file(self, src: Path, *, expected_sha256: str | None = None, progress: ProgressFn | None = None) -> str:
        """Copy ``src`` into the store and return its digest."""

        def chunks() -> Iterable[bytes]:
            with src.open("rb") as f:
                while chunk := f.read(CHUNK):
                    if progress:
                        progress(len(chunk))
                    yield chunk

        return self.put_chunks(chunks(), expected_sha256=expected_sha256)

    def adopt_file(self, src: Path, *, expected_sha256: str) -> str:
        """Store ``src``, a file its writer never changes again (a checkpoint's), and return its
        digest. Here, as ``put_file``, a copy; a local store takes the file itself
        (``LocalArtifactStore.adopt_file``), so its bytes are not on the disk twice."""
        return self.put_file(src, expected_sha256=expected_sha256)

    def put_chunks(self, chunks: Iterable[bytes], *, expected_sha256: str | None = None) -> str:
        """Store a byte stream and return its digest."""
        if expected_sha256 is not None:
            check_digest(expected_sha256)
        return self._keep(self.stage(chunks), expected_sha256)

    def _keep(self, staged: StagedBlob, expected_sha256: str | None) -> str:
        """Place ``staged`` under its name if that is the digest expected, and return it; the
        staged file is gone afterwards either way."""
        try:
            if expected_sha256 is not None and staged.digest != expected_sha256:
                raise ArtifactError(
                    f"hash mismatch: expected sha256 {expected_sha256}, got {staged.digest}", code="hash_mismatch"
                )
            with self.placing():
                self.place(staged)
            return staged.digest
        finally:
            staged.discard()

    def stage(self, chunks: Iterable[bytes]) -> StagedBlob:
        """Write a byte stream to a private temporary file, hashing it on the way; nothing is
        visible under a blob name until ``place``. The caller discards it."""
        h = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="blob-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException as exc:
            tmp.unlink(missing_ok=True)  # never a partial blob, even when the disk is full
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise InsufficientStorageError(
                    "no space left on device while writing to the artifact store; nothing was kept. "
                    "Free disk space and retry."
                ) from exc
            raise
        return StagedBlob(path=tmp, digest=h.hexdigest(), size=size)

    def share_with(self, cluster_lock: ClusterLock) -> None:
        """Coordinate with the other machines writing to these blobs (one bucket, several servers):
        ``cluster_lock(shared=...)`` is a lock all of them see (the database's advisory lock)."""
        self._cluster_lock = cluster_lock

    @contextmanager
    def placing(self) -> Iterator[None]:
        """Held while a blob is placed and its reference written. Writers on different machines
        hold it at once; a collector (``collecting``) on any of them waits for them, and they for it."""
        with self._machine_lock(), self._cluster_lock(shared=True):
            yield

    @contextmanager
    def collecting(self) -> Iterator[None]:
        """Held while a collector decides blobs are unreferenced and deletes them: no writer places a
        blob or writes a reference meanwhile, and no other collector runs, on any machine."""
        with self._machine_lock(), self._cluster_lock(shared=False):
            yield

    @contextmanager
    def _machine_lock(self) -> Iterator[None]:
        """Exclusive among the threads and processes of this machine (a thread lock and a ``flock``)."""
        with self._lock:
            fd = os.open(self._lock_dir, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing releases the flock

    def staged_files(self) -> Iterator[tuple[Path, float]]:
        """Temporary files of writes in progress (or abandoned by a crash), with their times."""
        for path in self._tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                yield path, path.stat().st_mtime

    def materialize(self, files: dict[str, str], target: Path) -> Path:
        """Lay out blobs as a model directory (``relative path -> digest``) using hard links.

        Hard links, not symlinks: the directory stays valid if moved, and a loader never follows a
        link out of the data directory.
        """
        target.mkdir(parents=True, exist_ok=True)
        for rel, digest in files.items():
            dest = safe_join(target, rel)
            if dest.exists():
                continue
            with contextlib.suppress(FileExistsError):  # another request laid out the same model at once
                link_or_copy(self.local_path(digest), dest)
        return target


class LocalArtifactStore(ArtifactStore):
    """Blobs as files under ``root/sha256/<first two hex digits>/<digest>``."""

    adopts_in_place = True

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._blobs = self.root / "sha256"
        super().__init__(staging=self.root / "tmp", lock=self._blobs)

    def _blob_path(self, digest: str) -> Path:
        path = self._blobs / check_digest(digest)[:2] / digest
        if path.is_symlink():
            raise ArtifactError(f"blob {digest} is a symbolic link; refusing it", code="unsafe_artifact")
        return path

    def place(self, staged: StagedBlob) -> bool:
        final = self._blob_path(staged.digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            os.utime(final)
            return False
        os.replace(staged.path, final)
        return True

    def blobs(self) -> Iterator[tuple[str, float]]:
        for path in self._blobs.glob("??/*"):
            if _DIGEST.fullmatch(path.name) and not path.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    yield path.name, path.stat().st_mtime

    def adopt_file(self, src: Path, *, expected_sha256: str) -> str:
        """Store ``src`` as a hard link to it, not a copy: the blob and ``src`` are then one file,
        which is why its writer must never change it in place. It is hashed through the link, so
        the blob holds what its name says even if ``src`` changed since ``expected_sha256`` was
        taken (then nothing is stored). Copied where it cannot be linked (another filesystem)."""
        check_digest(expected_sha256)
        link = self._tmp / f"blob-{uuid.uuid4().hex}"
        try:
            os.link(src, link)
        except OSError:
            return self.put_file(src, expected_sha256=expected_sha256)
        try:
            # A staged file's time is when it was staged: a collector takes older ones for
            # abandoned writes, and a placed blob's time starts its grace period.
            os.utime(link)
            staged = StagedBlob(path=link, digest=sha256_file(link), size=link.stat().st_size)
        except BaseException:
            link.unlink(missing_ok=True)
            raise
        return self._keep(staged, expected_sha256)

    def exists(self, digest: str) -> bool:
        return self._blob_path(digest).is_file()

    def local_path(self, digest: str) -> Path:
        path = self._blob_path(digest)
        if not path.is_file():
            raise ArtifactError(f"blob {digest} is missing from the store", code="artifact_missing")
        return path

    def delete(self, digest: str) -> None:
        self._blob_path(digest).unlink(missing_ok=True)


def link_or_copy(src: Path, dest: Path) -> None:
    """``dest`` (its directory made) as a hard link to ``src``, or a copy where no link can be made
    (another filesystem); FileExistsError if ``dest`` exists."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except FileExistsError:
        raise
    except OSError:
        shutil.copyfile(src, dest)


def safe_join(root: Path, rel: str) -> Path:
    """Join ``rel`` under ``root``, refusing anything that would leave it."""
    if not rel or "\x00" in rel or "\\" in rel or rel.startswith("/") or os.path.isabs(rel):
        raise ArtifactError(f"unsafe artifact path {rel!r}", param="path", code="unsafe_path")
    root = root.resolve()
    candidate = (root / rel).resolve()
    if candidate != root and root not in candidate.parents:
        raise ArtifactError(f"unsafe artifact path {rel!r}", param="path", code="unsafe_path")
    return candidate
