"""An eval's testing criteria (OpenAI's graders) checked when the eval is created: each a typed,
frozen grader whose templates name only what the items and samples hold. Graders that would run
the caller's code (``python``, and ``multi``, whose formula is code) are refused."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from llmos.errors import InvalidRequestError
from llmos.evals.templates import references

STRING_OPERATIONS = ("eq", "ne", "like", "ilike")
SIMILARITY_METRICS = ("fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l")
EMBEDDING_METRICS = ("cosine",)
UNSUPPORTED_METRICS = {"meteor": "meteor needs the WordNet corpus, which this server does not download"}
REFUSED_TYPES = {
    "python": "python graders run the caller's code, which this server never does",
    "multi": "multi graders compute their score with a formula, which this server never evaluates",
}
ROLES = ("user", "assistant", "system", "developer")
MAX_CRITERIA = 32
MAX_LABELS = 64
MAX_TEXT = 64 * 1024


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class StringCheck:
    name: str
    input: str
    reference: str
    operation: str
    type: str = "string_check"


@dataclass(frozen=True)
class TextSimilarity:
    name: str
    input: str
    reference: str
    evaluation_metric: str
    pass_threshold: float
    type: str = "text_similarity"


@dataclass(frozen=True)
class LabelModel:
    name: str
    model: str
    input: tuple[Message, ...]
    labels: tuple[str, ...]
    passing_labels: tuple[str, ...]
    type: str = "label_model"


@dataclass(frozen=True)
class ScoreModel:
    name: str
    model: str
    input: tuple[Message, ...]
    range: tuple[float, float] = (0.0, 1.0)
    pass_threshold: float | None = None
    sampling_params: dict[str, Any] = field(default_factory=dict)
    type: str = "score_model"

    @property
    def threshold(self) -> float:
        """The score an item needs: ``pass_threshold``, or the middle of the range."""
        return self.pass_threshold if self.pass_threshold is not None else sum(self.range) / 2


Grader = StringCheck | TextSimilarity | LabelModel | ScoreModel
ModelGrader = LabelModel | ScoreModel


def public(grader: Grader) -> dict[str, Any]:
    """The grader as OpenAI's eval object lists it."""
    out = asdict(grader)
    if isinstance(grader, LabelModel | ScoreModel):
        out["input"] = [{"role": m.role, "content": m.content, "type": "message"} for m in grader.input]
        for name in ("labels", "passing_labels", "range"):
            if name in out:
                out[name] = list(out[name])
    if isinstance(grader, ScoreModel) and not grader.sampling_params:
        out["sampling_params"] = None
    return out


def parse_criteria(value: Any, item_names: frozenset[str] | None) -> list[Grader]:
    """``testing_criteria`` checked: a 400 naming the first bad field (``testing_criteria[1].operation``).
    ``item_names``: the item schema's properties (templates may name only those), None when open."""
    if not isinstance(value, list) or not value:
        raise InvalidRequestError("testing_criteria must be a non-empty array of graders", param="testing_criteria")
    if len(value) > MAX_CRITERIA:
        raise InvalidRequestError(f"an eval has at most {MAX_CRITERIA} testing criteria", param="testing_criteria")
    graders = [_parse(c, f"testing_criteria[{i}]", item_names) for i, c in enumerate(value)]
    seen: set[str] = set()
    for i, grader in enumerate(graders):
        if grader.name in seen:
            raise InvalidRequestError(
                f"two testing criteria are named {grader.name!r}; names must be unique",
                param=f"testing_criteria[{i}].name",
            )
        seen.add(grader.name)
    return graders


def from_public(stored: list[dict[str, Any]]) -> list[Grader]:
    """The graders of a stored eval (checked when it was created)."""
    return [_parse(c, "testing_criteria", None) for c in stored]


class _Fields:
    """A grader object's fields, each read once with a 400 naming it when it is missing or wrong."""

    def __init__(self, obj: Mapping[str, Any], param: str, allowed: set[str]) -> None:
        self.obj, self.param = obj, param
        unknown = sorted(set(obj) - allowed)
        if unknown:
            raise InvalidRequestError(f"unknown field '{unknown[0]}'", param=f"{param}.{unknown[0]}")

    def text(self, name: str, *, template: bool = False, item_names: frozenset[str] | None = None) -> str:
        value = self.obj.get(name)
        where = f"{self.param}.{name}"
        if not isinstance(value, str) or not (value or template) or len(value) > MAX_TEXT:
            # A template may be empty (a string check against ""); a name or a model may not.
            raise InvalidRequestError(f"{name} must be a string of at most {MAX_TEXT} characters", param=where)
        if template:
            check_references(value, where, item_names)
        return value

    def number(self, name: str, *, required: bool) -> float | None:
        value = self.obj.get(name)
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequestError(f"{name} must be a number", param=f"{self.param}.{name}")
        return float(value)

    def choice(self, name: str, options: tuple[str, ...], refused: Mapping[str, str] | None = None) -> str:
        value = self.obj.get(name)
        if refused and isinstance(value, str) and value in refused:
            raise InvalidRequestError(
                f"{name} {value!r} is not supported: {refused[value]}", param=f"{self.param}.{name}"
            )
        if value not in options:
            raise InvalidRequestError(f"{name} must be one of {list(options)}", param=f"{self.param}.{name}")
        return str(value)

    def strings(self, name: str, limit: int) -> tuple[str, ...]:
        value = self.obj.get(name)
        if (
            not isinstance(value, list)
            or not 0 < len(value) <= limit
            or not all(isinstance(v, str) and 0 < len(v) <= 256 for v in value)
        ):
            raise InvalidRequestError(
                f"{name} must be 1 to {limit} non-empty strings of at most 256 characters", param=f"{self.param}.{name}"
            )
        return tuple(value)


def template_paths(grader: Grader) -> list[tuple[str, ...]]:
    """Every path the grader's templates name, e.g. ``("sample", "output_text")``."""
    if isinstance(grader, StringCheck | TextSimilarity):
        texts = [grader.input, grader.reference]
    else:
        texts = [m.content for m in grader.input]
    return [path for text in texts for path in references(text, param="testing_criteria")]


def check_references(text: str, param: str, item_names: frozenset[str] | None) -> None:
    """A template's placeholders are ``item.x`` (x one of the item schema's properties when it
    lists them) or ``sample.x``; anything else is a 400 naming ``param``."""
    for path in references(text, param=param):
        if path[0] == "item" and item_names is not None and len(path) > 1 and path[1] not in item_names:
            raise InvalidRequestError(
                f"template names item.{path[1]}, which the eval's item_schema does not define", param=param
            )


def parse_messages(value: Any, param: str, item_names: frozenset[str] | None) -> tuple[Message, ...]:
    """Chat messages of a template (``{role, content}``, content text or input/output text parts)."""
    if not isinstance(value, list) or not 0 < len(value) <= 64:
        raise InvalidRequestError("must be an array of 1 to 64 messages", param=param)
    messages = []
    for i, message in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequestError("a message must be an object", param=where)
        fields = _Fields(message, where, {"role", "content", "type"})
        if message.get("type", "message") != "message":
            raise InvalidRequestError("type must be 'message'", param=f"{where}.type")
        role = fields.choice("role", ROLES)
        content = _content_text(message.get("content"), f"{where}.content")
        check_references(content, f"{where}.content", item_names)
        messages.append(Message(role, content))
    return tuple(messages)


def _content_text(content: Any, param: str) -> str:
    """A message's text: a string, or text parts joined (images and audio are refused)."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    texts = []
    for i, part in enumerate(parts):
        where = f"{param}[{i}]" if isinstance(content, list) else param
        if isinstance(part, str):
            texts.append(part)
        elif (
            isinstance(part, dict)
            and part.get("type") in ("input_text", "output_text")
            and isinstance(part.get("text"), str)
        ):
            texts.append(part["text"])
        else:
            raise InvalidRequestError(
                "content must be text (input_text or output_text parts); images and audio are not supported",
                param=where,
            )
    if not texts:
        raise InvalidRequestError("content must not be empty", param=param)
    return "".join(texts)


def _string_check(obj: Mapping[str, Any], param: str, names: frozenset[str] | None) -> StringCheck:
    f = _Fields(obj, param, {"type", "name", "input", "reference", "operation"})
    return StringCheck(
        name=f.text("name"),
        input=f.text("input", template=True, item_names=names),
        reference=f.text("reference", template=True, item_names=names),
        operation=f.choice("operation", STRING_OPERATIONS),
    )


def _text_similarity(obj: Mapping[str, Any], param: str, names: frozenset[str] | None) -> TextSimilarity:
    f = _Fields(obj, param, {"type", "name", "input", "reference", "evaluation_metric", "pass_threshold"})
    threshold = f.number("pass_threshold", required=True)
    assert threshold is not None
    return TextSimilarity(
        name=f.text("name"),
        input=f.text("input", template=True, item_names=names),
        reference=f.text("reference", template=True, item_names=names),
        evaluation_metric=f.choice("evaluation_metric", SIMILARITY_METRICS + EMBEDDING_METRICS, UNSUPPORTED_METRICS),
        pass_threshold=threshold,
    )


def _label_model(obj: Mapping[str, Any], param: str, names: frozenset[str] | None) -> LabelModel:
    f = _Fields(obj, param, {"type", "name", "model", "input", "labels", "passing_labels"})
    labels = f.strings("labels", MAX_LABELS)
    passing = f.strings("passing_labels", MAX_LABELS)
    outside = [label for label in passing if label not in labels]
    if outside:
        raise InvalidRequestError(f"passing label {outside[0]!r} is not one of labels", param=f"{param}.passing_labels")
    return LabelModel(
        name=f.text("name"),
        model=f.text("model"),
        input=parse_messages(obj.get("input"), f"{param}.input", names),
        labels=labels,
        passing_labels=passing,
    )


SCORE_SAMPLING = {"max_completions_tokens", "seed", "temperature", "top_p"}


def _score_model(obj: Mapping[str, Any], param: str, names: frozenset[str] | None) -> ScoreModel:
    f = _Fields(obj, param, {"type", "name", "model", "input", "range", "pass_threshold", "sampling_params"})
    bounds = obj.get("range", [0, 1])
    if bounds is None:
        bounds = [0, 1]
    if (
        not isinstance(bounds, list)
        or len(bounds) != 2
        or not all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)
        or not bounds[0] < bounds[1]
    ):
        raise InvalidRequestError("range must be two numbers, the lower first", param=f"{param}.range")
    threshold = f.number("pass_threshold", required=False)
    if threshold is not None and not bounds[0] <= threshold <= bounds[1]:
        raise InvalidRequestError("pass_threshold must lie within range", param=f"{param}.pass_threshold")
    sampling = obj.get("sampling_params") or {}
    if not isinstance(sampling, dict):
        raise InvalidRequestError("sampling_params must be an object", param=f"{param}.sampling_params")
    checked = _Fields(sampling, f"{param}.sampling_params", SCORE_SAMPLING)
    for name in ("temperature", "top_p"):
        checked.number(name, required=False)
    for name in ("seed", "max_completions_tokens"):
        value = sampling.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InvalidRequestError(f"{name} must be a non-negative integer", param=f"{param}.sampling_params.{name}")
    return ScoreModel(
        name=f.text("name"),
        model=f.text("model"),
        input=parse_messages(obj.get("input"), f"{param}.input", names),
        range=(float(bounds[0]), float(bounds[1])),
        pass_threshold=threshold,
        sampling_params={k: v for k, v in sampling.items() if v is not None},
    )


_PARSERS: dict[str, Callable[[Mapping[str, Any], str, frozenset[str] | None], Grader]] = {
    "string_check": _string_check,
    "text_similarity": _text_similarity,
    "label_model": _label_model,
    "score_model": _score_model,
}


def _parse(obj: Any, param: str, item_names: frozenset[str] | None) -> Grader:
    if not isinstance(obj, dict):
        raise InvalidRequestError("a testing criterion must be an object", param=param)
    kind = obj.get("type")
    if kind in REFUSED_TYPES:
        raise InvalidRequestError(f"{kind} graders are not supported: {REFUSED_TYPES[kind]}", param=f"{param}.type")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        raise InvalidRequestError(f"type must be one of {sorted(_PARSERS)}", param=f"{param}.type")
    return parser(obj, param, item_names)
