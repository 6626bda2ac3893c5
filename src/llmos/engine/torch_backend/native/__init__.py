"""Small C kernels the engine compiles on first use, for this machine's CPU.

A kernel is one C file beside this module, built with the system's C compiler into a shared
library under the kernel cache (the ``kernel_dir`` setting, else ``~/.cache/llmos/kernels``; only if
this user alone may write there, else a fresh private temporary directory) and loaded
with ctypes: a plain C library needs neither Python's headers nor torch's, builds in well under a
second, and is chosen for the CPU it runs on (vector width). The file's name carries a hash of the
source, the compiler and its flags, so an upgrade or another machine's CPU gets its own build;
it is written under a temporary name and renamed, so processes building at once never load half
a file. Where no compiler is found or the build fails, ``load`` returns None, says why once in
the log, and the caller keeps its PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = Path(__file__).parent
BUILD_TIMEOUT_S = 120

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def load(name: str) -> ctypes.CDLL | None:
    """The kernel library ``name`` (``<name>.c`` here), built if needed; None if it cannot be."""
    with _lock:
        if name not in _loaded:
            _loaded[name] = _build_and_load(name)
        return _loaded[name]


_configured_dir: Path | None = None


def set_cache_dir(directory: str | Path | None) -> None:
    """Where kernels are built and cached (the ``kernel_dir`` setting; None: the default)."""
    global _configured_dir
    _configured_dir = Path(directory) if directory else None


def cache_dir() -> Path:
    if _configured_dir is not None:
        return _configured_dir
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llmos" / "kernels"


def cpu_flags() -> list[str]:
    """Vector extensions to compile for: the widest this CPU has (x86); others vectorise by default."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    words = set(info.split())
    if {"avx512f", "avx512bw"} <= words:
        return ["-mavx512f", "-mavx512bw"]
    if {"avx2", "fma"} <= words:
        return ["-mavx2", "-mfma"]
    return []


def _compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def _build_and_load(name: str) -> ctypes.CDLL | None:
    try:
        return _build_and_load_unguarded(name)
    except Exception:  # a kernel is an optimisation: never the reason a model fails to load
        log.warning("the %s kernel is not used (unexpected failure): its PyTorch path is", name, exc_info=True)
        return None


def _build_and_load_unguarded(name: str) -> ctypes.CDLL | None:
    source = SOURCES / f"{name}.c"
    compiler = _compiler()
    if compiler is None:
        log.warning("no C compiler found: the %s kernel is not built and its PyTorch path is used", name)
        return None
    flags = ["-O3", "-std=c11", "-shared", "-fPIC", *cpu_flags()]
    digest = hashlib.sha256(source.read_bytes() + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    for directory in (cache_dir(), None):
        fresh = None
        try:
            # A library is loaded only from a directory no one else may write to (a shared one
            # would let another user plant code under the predictable name); failing that, from
            # a fresh private directory, built anew each process.
            if directory is None or not _private(directory):
                directory = fresh = Path(tempfile.mkdtemp(prefix="llmos-kernels-"))
            library = directory / f"{name}-{digest}.so"
            if not library.exists():
                _compile(compiler, flags, source, library)
            return ctypes.CDLL(str(library))
        except (OSError, subprocess.SubprocessError) as exc:
            reason = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else exc
            log.warning("the %s kernel could not be built in %s (%s)", name, directory, str(reason).strip()[:500])
        finally:
            if fresh is not None:  # a loaded library stays mapped: its file is not needed
                shutil.rmtree(fresh, ignore_errors=True)
    log.warning("the %s kernel is not used: its PyTorch path is", name)
    return None


def _private(directory: Path) -> bool:
    """Whether ``directory`` exists (created if need be) owned by this user, writable by no one else."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        status = directory.stat()
    except OSError:
        return False
    return status.st_uid == os.getuid() and not status.st_mode & 0o022


def _compile(compiler: str, flags: list[str], source: Path, library: Path) -> None:
    partial = library.with_name(f"{library.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        subprocess.run(
            [compiler, *flags, "-o", str(partial), str(source)],
            check=True,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
        os.replace(partial, library)
    finally:
        partial.unlink(missing_ok=True)
