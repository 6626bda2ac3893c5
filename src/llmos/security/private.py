"""Owner-only data: ``LLMOS_HOME`` holds the database, uploaded training data, checkpoints and the
server secret, so everything in it is readable and writable by its owner alone.

Processes that write there (every ``llmos`` command, the training worker) start with a umask of
0o077, so new directories are 0700 and new files 0600; at start-up ``secure_home`` also tightens
whatever an earlier run, another tool or a copy left looser, and says so in the log.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import stat
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_UMASK = 0o077
_SECRET_BYTES = 32


def restrict_umask() -> None:
    """New files of this process (and of the processes it starts) are its owner's alone."""
    os.umask(PRIVATE_UMASK)


def secure_home(home: Path) -> list[Path]:
    """Create ``home`` owner-only and remove group and other permissions from everything in it.
    Returns the paths that were looser (each logged as a warning)."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    loose: list[Path] = []
    for root, _dirs, files in os.walk(home):  # every directory is the root of one step
        base = Path(root)
        loose += [path for path in (base, *(base / name for name in files)) if _tighten(path)]
    if loose:
        log.warning(
            "%d path(s) in %s were readable or writable by other users (e.g. %s); made owner-only",
            len(loose),
            home,
            loose[0],
        )
    return loose


def _tighten(path: Path) -> bool:
    try:
        st = path.lstat()
    except FileNotFoundError:  # removed while walking (a temporary file)
        return False
    if stat.S_ISLNK(st.st_mode) or not st.st_mode & 0o077:
        return False
    try:
        path.chmod(stat.S_IMODE(st.st_mode) & 0o700)
    except OSError as exc:  # not ours to change: the warning still names it
        log.warning("could not make %s owner-only: %s", path, exc)
    return True


def read_or_create_secret(path: Path) -> bytes:
    """The server secret API keys are hashed with: read from ``path``, or created there once
    (0600, written whole before it appears, so concurrent first starts agree on one)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        staged = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(_SECRET_BYTES) + "\n")
        try:
            os.link(staged, path)  # fails if another process created it first: theirs is kept
        except FileExistsError:
            pass
        finally:
            staged.unlink()
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("the server secret %s is readable by other users (mode %o); chmod 600 it", path, mode)
    text = path.read_text().strip()
    if len(text) < 32:
        raise ValueError(f"the server secret {path} is shorter than 32 characters; remove it to create a new one")
    return hashlib.sha256(text.encode()).digest()
