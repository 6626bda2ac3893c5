"""Exports as operations (``registry.operations``): checked before anything runs, then on a
background thread the model is prepared (a LoRA adapter merged), written in the format, verified
against the torch model and, only if it passes, stored as a file of the files API (purpose
``model-export``) whose summary carries its lineage: the model version, its artifacts' hashes,
the format and the verification report."""

from __future__ import annotations

import re
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmos.export.formats import ExportFormat, check_export
from llmos.export.source import Source, prepare, resolve_source
from llmos.registry.files import FileStore
from llmos.registry.operations import Operation, Operations, Work
from llmos.registry.service import ModelRegistry
from llmos.registry.sources import Progress

EXPORT_PURPOSE = "model-export"
CHUNK = 1 << 20


@dataclass
class ExportOperation(Operation):
    format: str = ""
    model_id: str = ""
    file_id: str | None = None
    """The export's file once it passed verification (download it at ``/v1/files/{id}/content``)."""
    verification: dict[str, Any] | None = None

    def public(self) -> dict[str, Any]:
        return {
            "object": "model.export",
            "model": self.ref,
            "format": self.format,
            "file_id": self.file_id,
            "verification": self.verification,
            **super().public(),
        }

    def succeed(self, **result: Any) -> None:
        self.file_id, self.verification = result["file_id"], result["verification"]


class ExportOperations(Operations[ExportOperation]):
    """One export at a time by default: each loads the model and runs it several times."""

    def __init__(self, registry: ModelRegistry, files: FileStore, *, max_running: int = 1) -> None:
        super().__init__(kind="model export", prefix="export", max_running=max_running)
        self._registry = registry
        self._files = files

    def start(self, ref: str, fmt_name: object, *, tenant: str, visible_to: str | None) -> ExportOperation:
        """Export on a background thread (``plan``'s checks first); follow the operation."""
        op, work = self.plan(ref, fmt_name, tenant=tenant, visible_to=visible_to)
        return self.launch(op, work)

    def plan(self, ref: str, fmt_name: object, *, tenant: str, visible_to: str | None) -> tuple[ExportOperation, Work]:
        """The export of model ``ref`` (as ``visible_to`` sees the registry; None: every model) as
        ``fmt_name`` into a file of ``tenant``, and the work that makes it (run it with a progress
        reporter: it returns the file id and the verification report). 404/400/503 here, before
        anything runs."""
        record = self._registry.get(ref, tenant=visible_to)
        source = resolve_source(self._registry, record)
        fmt = check_export(fmt_name, source)
        op = ExportOperation(
            id=self.new_id(), ref=f"{record.name}@{record.version}", tenant=tenant, format=fmt.name, model_id=record.id
        )
        return op, lambda progress: self._export(op, source, fmt, progress)

    def _export(self, op: ExportOperation, source: Source, fmt: ExportFormat, progress: Progress) -> dict[str, Any]:
        tmp = self._registry.home / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="export-", dir=tmp))
        try:
            progress.stage("loading the model and its reference answers")
            prepared = prepare(source, staging)
            progress.stage(f"writing {fmt.name}")
            built = fmt.build(prepared, staging / "export")
            progress.stage("verifying the export against the model")
            report = fmt.verify(prepared, built)
            progress.stage("storing the export")
            name = re.sub(r"[^A-Za-z0-9._-]", "_", op.ref.replace("@", "-v"))
            offered = built if built.is_file() else _tar(built, staging / f"{name}.{fmt.name}.tar")
            record = source.record
            lineage = {
                "source": "model-export",
                "export_id": op.id,
                "model": op.ref,
                "model_id": record.id,
                "parent_id": record.parent_id,
                "base_id": record.base_id,
                "model_artifacts": dict(record.artifacts),
                "format": fmt.name,
                "verification": report,
            }
            file, _ = self._files.create(
                tenant=op.tenant,
                purpose=EXPORT_PURPOSE,
                filename=offered.name,
                chunks=_chunks(offered),
                max_bytes=sys.maxsize,  # bounded by the tenant's storage quota, checked by the store
                generated=True,
                lineage=lineage,
            )
            return {"file_id": file.id, "verification": report}
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def model_exports(files: FileStore, tenant: str, model_id: str) -> list[dict[str, Any]]:
    """The exports of model version ``model_id`` kept as ``tenant``'s files, newest first: each
    file's id, name, format, size, creation time and verification report (from its lineage).
    Another tenant's exports of the same model are its own files and never appear."""
    records, _ = files.list(tenant, purpose=EXPORT_PURPOSE)
    return [
        {
            "file_id": f.id,
            "filename": f.filename,
            "format": f.summary["lineage"].get("format"),
            "bytes": f.bytes,
            "created_at": int(f.created_at.timestamp()),
            "verification": f.summary["lineage"].get("verification"),
        }
        for f in records
        if (f.summary.get("lineage") or {}).get("model_id") == model_id
    ]


def _tar(directory: Path, path: Path) -> Path:
    """The directory's files under one folder named like the archive (uncompressed: weights do not shrink)."""
    top = path.name.removesuffix(".tar")
    with tarfile.open(path, "w") as archive:
        for file in sorted(p for p in directory.rglob("*") if p.is_file()):
            archive.add(file, arcname=f"{top}/{file.relative_to(directory).as_posix()}")
    return path


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk
