"""What a pre-training job asks for: ``method: {"type": "pretrain", "pretrain": {...}}`` on the
fine-tuning jobs API (docs/fine-tuning.md, ADR 0022). The loop's settings become a
``TrainingSpec`` like any job's; what only pre-training has (architecture, tokenizer, split,
more corpus files, samples) a ``PretrainSpec``. Everything is checked before the job is queued."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from llmos.errors import InvalidRequestError
from llmos.training.model_presets import ModelDims, resolve_dims
from llmos.training.spec import SCHEDULES, TrainingSpec, _hyperparameters, _number, parse_gpus
from llmos.training.tokenizer_training import MIN_VOCAB

SECTION = "method.pretrain"
FIELDS = frozenset(
    {
        "hyperparameters",
        "architecture",
        "tokenizer",
        "max_seq_length",
        "gradient_accumulation_steps",
        "warmup_ratio",
        "lr_scheduler",
        "weight_decay",
        "early_stopping_patience",
        "validation_split",
        "training_files",
        "samples",
    }
)
MAX_CORPUS_FILES = 16
MAX_VOCAB = 262144
DEFAULT_VOCAB = 4096
MAX_SAMPLE_PROMPTS = 4


@dataclass(frozen=True)
class PretrainSpec:
    model: str
    """``llama-<preset>`` or ``llama``: the architecture the job builds."""
    dims: ModelDims
    tokenizer: str
    """``bpe``: trained on the corpus; ``model``: a registered model's."""
    vocab_size: int | None = None
    """The BPE's size (``bpe``)."""
    tokenizer_model: str | None = None
    """The registered model whose tokenizer is reused (``model``), by name as asked, and its id."""
    tokenizer_model_id: str | None = None
    validation_split: float = 0.1
    """Share of the corpus held out for validation when the job has no validation file."""
    training_files: tuple[str, ...] = ()
    """Corpus files besides ``training_file``."""
    corpus_sha256: tuple[str, ...] = ()
    """Every training corpus file's content hash, ``training_file``'s first (set when queued)."""
    sample_prompts: tuple[str, ...] = ()
    """Text each validation continues in a sample event ("" starts a new document); none: the
    first line of the held-out text."""
    sample_tokens: int = 64

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["dims"] = self.dims.as_dict()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PretrainSpec:
        """The spec a queued job recorded (written by ``as_dict``)."""
        return cls(
            **{
                **data,
                "dims": ModelDims(**data["dims"]),
                "training_files": tuple(data.get("training_files", ())),
                "corpus_sha256": tuple(data.get("corpus_sha256", ())),
                "sample_prompts": tuple(data.get("sample_prompts", ())),
            }
        )


def is_pretrain(method: Any) -> bool:
    return isinstance(method, dict) and method.get("type") == "pretrain"


def parse_pretrain(
    method: dict[str, Any], legacy_hyperparameters: Any, *, model: Any, has_validation_file: bool
) -> tuple[TrainingSpec, PretrainSpec]:
    """The loop's settings and pre-training's own from a ``pretrain`` method; 400 naming the field."""
    other = sorted(set(method) - {"type", "pretrain"})
    if other:
        raise InvalidRequestError(
            f"method.{other[0]} does not apply to method.type 'pretrain'", param=f"method.{other[0]}"
        )
    options = method.get("pretrain") or {}
    if not isinstance(options, dict):
        raise InvalidRequestError(f"{SECTION} must be an object", param=SECTION)
    unknown = sorted(set(options) - FIELDS)
    if unknown:
        raise InvalidRequestError(f"unknown field {SECTION}.{unknown[0]}", param=f"{SECTION}.{unknown[0]}")
    hp = _hyperparameters(options, legacy_hyperparameters, SECTION)
    names = ("n_epochs", "batch_size", "learning_rate_multiplier")
    bad = sorted(set(hp) - set(names))
    if bad:
        raise InvalidRequestError(f"unknown hyperparameters {bad}", param=hp[bad[0]][1])

    def hyperparameter(name: str, kind: type, low: float, high: float, auto: Any) -> Any:
        value, param = hp.get(name, (None, name))
        return _number(value, param, kind, low, high, auto)

    def setting(name: str, kind: type, low: float, high: float, auto: Any) -> Any:
        return _number(options.get(name), f"{SECTION}.{name}", kind, low, high, auto)

    schedule = options.get("lr_scheduler", "cosine")
    if schedule not in SCHEDULES:
        raise InvalidRequestError(f"lr_scheduler must be one of {list(SCHEDULES)}", param=f"{SECTION}.lr_scheduler")
    patience = options.get("early_stopping_patience")
    split = options.get("validation_split")
    if split is not None and has_validation_file:
        raise InvalidRequestError(
            "validation_split applies only when the job has no validation_file", param=f"{SECTION}.validation_split"
        )
    spec = TrainingSpec(
        n_epochs=hyperparameter("n_epochs", int, 1, 1000, 3),
        batch_size=hyperparameter("batch_size", int, 1, 1024, 16),
        learning_rate_multiplier=hyperparameter("learning_rate_multiplier", float, 1e-3, 100.0, 1.0),
        adapter="full",
        max_seq_length=setting("max_seq_length", int, 16, 8192, 256),
        gradient_accumulation_steps=setting("gradient_accumulation_steps", int, 1, 256, 1),
        warmup_ratio=setting("warmup_ratio", float, 0.0, 0.5, 0.05),
        lr_scheduler=schedule,
        early_stopping_patience=None if patience is None else setting("early_stopping_patience", int, 1, 50, None),
        weight_decay=setting("weight_decay", float, 0.0, 1.0, 0.1),
        method="pretrain",
        gpus=parse_gpus(options.get("gpus"), f"{SECTION}.gpus"),
    )
    preset, dims = resolve_dims(model, options.get("architecture"), f"{SECTION}.architecture")
    prompts, tokens = _samples(options.get("samples"))
    return spec, PretrainSpec(
        model=preset,
        dims=dims,
        **_tokenizer(options.get("tokenizer")),
        validation_split=setting("validation_split", float, 0.01, 0.5, 0.1),
        training_files=_files(options.get("training_files")),
        sample_prompts=prompts,
        sample_tokens=tokens,
    )


def _tokenizer(value: Any) -> dict[str, Any]:
    param = f"{SECTION}.tokenizer"
    value = {"type": "bpe"} if value is None else value
    if not isinstance(value, dict) or value.get("type") not in ("bpe", "model"):
        raise InvalidRequestError(
            "tokenizer must be {'type': 'bpe', 'vocab_size': n} or {'type': 'model', 'model': name}", param=param
        )
    kind = value["type"]
    allowed = {"type", "vocab_size"} if kind == "bpe" else {"type", "model"}
    extra = sorted(set(value) - allowed)
    if extra:
        raise InvalidRequestError(f"{extra[0]} does not apply to a {kind} tokenizer", param=f"{param}.{extra[0]}")
    if kind == "bpe":
        vocab = _number(value.get("vocab_size"), f"{param}.vocab_size", int, MIN_VOCAB, MAX_VOCAB, DEFAULT_VOCAB)
        return {"tokenizer": "bpe", "vocab_size": vocab}
    name = value.get("model")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError("tokenizer.model must name a registered model", param=f"{param}.model")
    return {"tokenizer": "model", "tokenizer_model": name}


def _files(value: Any) -> tuple[str, ...]:
    param = f"{SECTION}.training_files"
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(f, str) for f in value):
        raise InvalidRequestError("training_files must be a list of file ids", param=param)
    if len(value) > MAX_CORPUS_FILES - 1:
        raise InvalidRequestError(f"a corpus has at most {MAX_CORPUS_FILES} files in all", param=param)
    return tuple(value)


def _samples(value: Any) -> tuple[tuple[str, ...], int]:
    param = f"{SECTION}.samples"
    if value is None:
        return (), 64
    if not isinstance(value, dict) or set(value) - {"prompts", "max_tokens"}:
        raise InvalidRequestError("samples must be an object {'prompts': [...], 'max_tokens': n}", param=param)
    prompts = value.get("prompts", [])
    if (
        not isinstance(prompts, list)
        or len(prompts) > MAX_SAMPLE_PROMPTS
        or not all(isinstance(p, str) and len(p) <= 1000 for p in prompts)
    ):
        raise InvalidRequestError(
            f"samples.prompts must be at most {MAX_SAMPLE_PROMPTS} strings of at most 1000 characters",
            param=f"{param}.prompts",
        )
    return tuple(prompts), _number(value.get("max_tokens"), f"{param}.max_tokens", int, 1, 512, 64)
