"""An eval's data: its ``data_source_config`` (the item schema runs must match) and a run's
``data_source`` (the items, from inline content, an ``evals`` file or stored completions, and
whether a model answers them first), checked whole before anything is stored."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from llmos.errors import InvalidRequestError
from llmos.evals.criteria import Message, parse_messages
from llmos.registry.completions import CompletionStore, StoredCompletion
from llmos.registry.files import FileStore
from llmos.registry.metadata import check_metadata
from llmos.training.datasets import DatasetError, iter_lines, jsonl_objects

MAX_ITEMS = 10_000
"""Items in one run: a run's items are kept with it, so a restart resumes it from the same items."""
EVALS_PURPOSE = "evals"
SAMPLE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "choices": {"type": "array"},
        "output_text": {"type": "string"},
        "output_json": {"type": "object"},
    },
    "required": ["model", "choices", "output_text"],
}
STORED_ITEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "model": {"type": "string"},
        "input": {"type": "array", "items": {"type": "object"}},
        "output_text": {"type": "string"},
        "metadata": {"type": "object"},
    },
    "required": ["id", "model", "input", "output_text"],
}
"""The item of a stored completion: what was asked (``input``) and answered (``output_text``)."""
GENERATION_FIELDS = {"max_completion_tokens", "seed", "temperature", "top_p", "response_format", "tools"}


@dataclass(frozen=True)
class DataSourceConfig:
    type: str
    item_schema: dict[str, Any]
    include_sample_schema: bool = False
    metadata: dict[str, str] | None = None

    @property
    def item_names(self) -> frozenset[str] | None:
        """The names a template may use after ``item.``: the schema's properties, None when it lists none."""
        properties = self.item_schema.get("properties")
        return frozenset(properties) if isinstance(properties, dict) and properties else None

    def public(self) -> dict[str, Any]:
        with_sample = self.include_sample_schema or self.type != "custom"
        properties = {"item": self.item_schema, **({"sample": SAMPLE_SCHEMA} if with_sample else {})}
        schema = {"type": "object", "properties": properties, "required": sorted(properties)}
        out: dict[str, Any] = {"type": self.type, "schema": schema}
        if self.type != "custom":
            out["metadata"] = self.metadata
        return out

    def stored(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "item_schema": self.item_schema,
            "include_sample_schema": self.include_sample_schema,
            "metadata": self.metadata,
        }


def parse_config(value: Any) -> DataSourceConfig:
    """``data_source_config``: ``custom`` with a JSON Schema for items, or ``stored_completions``
    (``logs``, OpenAI's newer name) with a metadata filter."""
    param = "data_source_config"
    if not isinstance(value, dict):
        raise InvalidRequestError("data_source_config must be an object", param=param)
    kind = value.get("type")
    if kind == "custom":
        _only(value, {"type", "item_schema", "include_sample_schema"}, param)
        schema = value.get("item_schema")
        if not isinstance(schema, dict):
            raise InvalidRequestError("item_schema must be a JSON Schema object", param=f"{param}.item_schema")
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            raise InvalidRequestError(
                f"item_schema is not a valid JSON Schema: {exc.message[:300]}", param=f"{param}.item_schema"
            ) from exc
        include = value.get("include_sample_schema", False)
        if not isinstance(include, bool):
            raise InvalidRequestError("include_sample_schema must be a boolean", param=f"{param}.include_sample_schema")
        return DataSourceConfig("custom", schema, include)
    if kind in ("stored_completions", "logs"):
        _only(value, {"type", "metadata"}, param)
        metadata = check_metadata(value.get("metadata"), param=f"{param}.metadata")
        return DataSourceConfig(str(kind), STORED_ITEM_SCHEMA, True, metadata)
    raise InvalidRequestError("type must be 'custom', 'stored_completions' or 'logs'", param=f"{param}.type")


def config_from_stored(stored: Mapping[str, Any]) -> DataSourceConfig:
    return DataSourceConfig(
        stored["type"], stored["item_schema"], stored["include_sample_schema"], stored.get("metadata")
    )


def _only(obj: Mapping[str, Any], allowed: set[str], param: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise InvalidRequestError(f"unknown field '{unknown[0]}'", param=f"{param}.{unknown[0]}")


# -- the files of purpose ``evals`` ------------------------------------------------------------
def validate_eval_file(path: Path) -> dict[str, Any]:
    """An ``evals`` file: JSONL lines ``{"item": {...}, "sample": {...}?}`` (OpenAI's format)."""
    count = 0
    for number, record in jsonl_objects(iter_lines(path)):
        _check_line(record, number)
        count += 1
        if count > MAX_ITEMS:
            raise DatasetError(f"an evals file holds at most {MAX_ITEMS} items")
    if not count:
        raise DatasetError("the file is empty")
    return {"records": count}


def _check_line(record: Mapping[str, Any], number: int) -> None:
    unknown = sorted(set(record) - {"item", "sample"})
    if unknown:
        raise DatasetError(f"unknown field {unknown[0]!r}", line=number, field=unknown[0])
    if not isinstance(record.get("item"), dict):
        raise DatasetError("must be an object", line=number, field="item")
    if "sample" in record and not isinstance(record["sample"], dict):
        raise DatasetError("must be an object", line=number, field="sample")


# -- a run's data source ---------------------------------------------------------------------
@dataclass(frozen=True)
class Generation:
    """How a model answers each item: ``template`` messages, or the messages at ``item_reference``."""

    model: str
    template: tuple[Message, ...] = ()
    item_reference: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)

    def stored(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "template": [{"role": m.role, "content": m.content} for m in self.template],
            "item_reference": self.item_reference,
            "sampling": self.sampling,
        }

    @classmethod
    def from_stored(cls, stored: Mapping[str, Any]) -> Generation:
        template = tuple(Message(m["role"], m["content"]) for m in stored["template"])
        return cls(stored["model"], template, stored["item_reference"], dict(stored["sampling"]))


@dataclass(frozen=True)
class RunData:
    items: list[dict[str, Any]]
    """Each ``{"item": ..., "sample": ...?}``, in order: its index is ``datasource_item_id``."""
    generation: Generation | None
    model: str
    """The model evaluated: the one answering, or the one that answered the stored completions."""


def parse_run_source(
    value: Any,
    config: DataSourceConfig,
    *,
    tenant: str,
    files: FileStore,
    completions: CompletionStore,
    uses_sample: bool,
) -> RunData:
    """A run's ``data_source`` checked whole: every item against the eval's item schema, a sample
    for every item when the graders read one. A 400 names the first bad field."""
    param = "data_source"
    if not isinstance(value, dict):
        raise InvalidRequestError("data_source must be an object", param=param)
    kind = value.get("type")
    if kind == "jsonl":
        _only(value, {"type", "source"}, param)
        items = _source_items(value.get("source"), tenant, files, completions, allow_stored=False)
        generation = None
    elif kind == "completions":
        _only(value, {"type", "source", "input_messages", "model", "sampling_params"}, param)
        items = _source_items(value.get("source"), tenant, files, completions, allow_stored=True)
        generation = _generation(value, config)
    elif kind == "responses":
        raise InvalidRequestError(
            "data_source type 'responses' is not supported; use 'jsonl' or 'completions'", param=f"{param}.type"
        )
    else:
        raise InvalidRequestError("type must be 'jsonl' or 'completions'", param=f"{param}.type")
    validator = Draft202012Validator(config.item_schema)
    for i, entry in enumerate(items):
        error = next(iter(validator.iter_errors(entry["item"])), None)
        if error is not None:
            where = "".join(f"[{p!r}]" if isinstance(p, str) else f"[{p}]" for p in error.absolute_path)
            raise InvalidRequestError(
                f"item {i}{where} does not match the eval's item_schema: {error.message[:300]}",
                param=f"{param}.source.content[{i}].item",
            )
        if uses_sample and generation is None and not isinstance(entry.get("sample"), dict):
            raise InvalidRequestError(
                f"item {i} has no sample, which the eval's testing criteria read ({{{{sample...}}}}); give each "
                "item a sample or let a model answer (data_source type 'completions')",
                param=f"{param}.source.content[{i}].sample",
            )
    model = generation.model if generation else _answered_by(items)
    return RunData(items, generation, model)


def _answered_by(items: list[dict[str, Any]]) -> str:
    models = {str(e.get("sample", {}).get("model")) for e in items if e.get("sample", {}).get("model")}
    return models.pop() if len(models) == 1 else ""


def _source_items(
    source: Any, tenant: str, files: FileStore, completions: CompletionStore, *, allow_stored: bool
) -> list[dict[str, Any]]:
    param = "data_source.source"
    if not isinstance(source, dict):
        raise InvalidRequestError("source must be an object", param=param)
    kind = source.get("type")
    if kind == "file_content":
        _only(source, {"type", "content"}, param)
        content = source.get("content")
        if not isinstance(content, list) or not 0 < len(content) <= MAX_ITEMS:
            raise InvalidRequestError(f"content must hold 1 to {MAX_ITEMS} items", param=f"{param}.content")
        for i, record in enumerate(content):
            if not isinstance(record, dict):
                raise InvalidRequestError("an item must be an object", param=f"{param}.content[{i}]")
            try:
                _check_line(record, i)
            except DatasetError as exc:
                raise InvalidRequestError(exc.message, param=f"{param}.content[{i}].{exc.field or 'item'}") from exc
        return [dict(record) for record in content]
    if kind == "file_id":
        _only(source, {"type", "id"}, param)
        file_id = source.get("id")
        if not isinstance(file_id, str):
            raise InvalidRequestError("id must be a file id", param=f"{param}.id")
        record = files.get(tenant, file_id)  # another tenant's file does not exist: 404
        if record.purpose != EVALS_PURPOSE:
            raise InvalidRequestError(
                f"file {file_id} has purpose {record.purpose!r}; an eval's items need purpose '{EVALS_PURPOSE}'",
                param=f"{param}.id",
            )
        if record.status != "processed":
            raise InvalidRequestError(f"file {file_id} is invalid: {record.status_details}", param=f"{param}.id")
        path = files.content_path(tenant, file_id)
        return [dict(r) for _, r in jsonl_objects(iter_lines(path))]
    if kind == "stored_completions" and allow_stored:
        return _stored_items(source, tenant, completions)
    kinds = "'file_content', 'file_id' or 'stored_completions'" if allow_stored else "'file_content' or 'file_id'"
    raise InvalidRequestError(f"type must be {kinds}", param=f"{param}.type")


def _stored_items(source: Mapping[str, Any], tenant: str, completions: CompletionStore) -> list[dict[str, Any]]:
    param = "data_source.source"
    _only(source, {"type", "created_after", "created_before", "limit", "metadata", "model"}, param)
    bounds: dict[str, datetime | None] = {}
    for name in ("created_after", "created_before"):
        stamp = source.get(name)
        if stamp is not None and (isinstance(stamp, bool) or not isinstance(stamp, int) or stamp < 0):
            raise InvalidRequestError(f"{name} must be a Unix timestamp", param=f"{param}.{name}")
        bounds[name] = None if stamp is None else datetime.fromtimestamp(stamp, UTC)
    limit = source.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= MAX_ITEMS):
        raise InvalidRequestError(f"limit must be 1 to {MAX_ITEMS}", param=f"{param}.limit")
    model = source.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequestError("model must be a string", param=f"{param}.model")
    records, _ = completions.list(
        tenant,
        model=model,
        metadata=check_metadata(source.get("metadata"), param=f"{param}.metadata"),
        created_after=bounds["created_after"],
        created_before=bounds["created_before"],
        limit=limit or MAX_ITEMS,
    )
    if not records:
        raise InvalidRequestError("no stored completions match this source", param=param)
    return [{"item": stored_item(r), "sample": stored_sample(r)} for r in records]


def stored_item(record: StoredCompletion) -> dict[str, Any]:
    return {
        "id": record.id,
        "model": record.model,
        "input": record.messages,
        "output_text": record.answer(0) or "",
        "metadata": record.metadata,
    }


def stored_sample(record: StoredCompletion) -> dict[str, Any]:
    return {"model": record.model, "choices": record.response.get("choices", []), "output_text": record.answer(0) or ""}


def _generation(value: Mapping[str, Any], config: DataSourceConfig) -> Generation | None:
    """The model and prompt of a ``completions`` run; None when it grades stored answers as they are."""
    param = "data_source"
    model, messages = value.get("model"), value.get("input_messages")
    if model is None and messages is None:
        if (value.get("source") or {}).get("type") != "stored_completions":
            raise InvalidRequestError("a completions run needs model and input_messages", param=f"{param}.model")
        return None
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("model must name the model that answers each item", param=f"{param}.model")
    if not isinstance(messages, dict):
        raise InvalidRequestError("input_messages must be an object", param=f"{param}.input_messages")
    sampling = value.get("sampling_params") or {}
    if not isinstance(sampling, dict):
        raise InvalidRequestError("sampling_params must be an object", param=f"{param}.sampling_params")
    if sampling.get("reasoning_effort") is not None:
        raise InvalidRequestError(
            "reasoning_effort is not supported", param=f"{param}.sampling_params.reasoning_effort"
        )
    _only({k: v for k, v in sampling.items() if k != "reasoning_effort"}, GENERATION_FIELDS, f"{param}.sampling_params")
    sampling = {k: v for k, v in sampling.items() if v is not None and k != "reasoning_effort"}
    where = f"{param}.input_messages"
    if messages.get("type") == "template":
        _only(messages, {"type", "template"}, where)
        template = parse_messages(messages.get("template"), f"{where}.template", config.item_names)
        for i, message in enumerate(template):
            if "{{sample." in message.content.replace(" ", ""):
                raise InvalidRequestError("a prompt cannot name the sample it produces", param=f"{where}.template[{i}]")
        return Generation(model, template=template, sampling=sampling)
    if messages.get("type") == "item_reference":
        _only(messages, {"type", "item_reference"}, where)
        reference = messages.get("item_reference")
        if not isinstance(reference, str) or not reference.startswith("item.") or len(reference) > 256:
            raise InvalidRequestError("item_reference must name a path in item, e.g. item.input", param=where)
        return Generation(model, item_reference=reference, sampling=sampling)
    raise InvalidRequestError("type must be 'template' or 'item_reference'", param=f"{where}.type")
