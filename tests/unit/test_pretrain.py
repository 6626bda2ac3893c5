"""Pre-training from raw text: corpus files checked at upload, the platform's seeded split, the BPE
tokenizer, the one loop's training (loss falls, validation per character and per byte, samples,
an exact resume after an interrupt), the result served by /v1/completions, and bad jobs refused
with 400 before anything is queued."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from llmos.cli.tuning import loss_curve
from llmos.errors import InvalidRequestError
from llmos.kernel.jobs import JobStore
from llmos.kernel.supervisor import JobSupervisor
from llmos.platform import Platform
from llmos.training import pretrain as pretraining
from llmos.training.checkpoints import SERVABLE
from llmos.training.corpus import split_corpus, validate_corpus
from llmos.training.datasets import DatasetError
from llmos.training.model_presets import ModelDims
from llmos.training.pretrain import TOKENIZER_DIR, positions, run_pretrain
from llmos.training.pretrain_spec import PretrainSpec
from llmos.training.run import CheckpointSource, Hooks, PretrainInputs, Stopped, TrainingResult, TrainingRun
from llmos.training.spec import TrainingSpec
from llmos.training.tokenizer_training import END_OF_TEXT, encode_documents, train_bpe
from tests.conftest import ADMIN_KEY
from tests.unit.test_fine_tuning import drive

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
}


def corpus(lines: int = 400, seed: int = 0) -> str:
    """Text with a grammar to learn: names, verbs and objects drawn from small sets."""
    rng = random.Random(seed)
    names, verbs, things = (
        ["ROMEO", "JULIET", "NURSE", "FRIAR"],
        ["loves", "fears", "keeps", "seeks"],
        [
            "the moon",
            "a rose",
            "the night",
            "my heart",
        ],
    )
    return "".join(f"{rng.choice(names)}: I {rng.choice(verbs)} {rng.choice(things)}.\n" for _ in range(lines))


# -- corpus files ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b" \n\t\n", "no text"),
        (b"text\x00\x01binary", "binary"),
        (b"caf\xc3", "ends inside a UTF-8 character"),
        (b"na\xefve", "not valid UTF-8"),
    ],
)
def test_a_corpus_that_is_not_text_is_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=message):
        validate_corpus(path)


def test_a_text_corpus_is_measured(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("première ligne\nsecond line")
    assert validate_corpus(path) == {"format": "text", "characters": 26, "lines": 2}


def test_the_platform_split_is_seeded_disjoint_and_complete() -> None:
    texts = [corpus(2000, seed=1), corpus(500, seed=2)]
    train, valid = split_corpus(texts, 0.1, seed=5)
    assert (train, valid) == split_corpus(texts, 0.1, seed=5)
    assert valid != split_corpus(texts, 0.1, seed=6)[1]
    held = sum(map(len, valid)) / sum(map(len, texts))
    assert 0.05 < held < 0.2
    assert sorted("".join(train + valid)) == sorted("".join(texts))  # every character on exactly one side
    with pytest.raises(DatasetError, match="too short"):
        split_corpus(["tiny"], 0.1, seed=5)


def test_a_trained_bpe_round_trips_any_text(tmp_path: Path) -> None:
    tokenizer = train_bpe([corpus()], 300, tmp_path / "tok")
    assert len(tokenizer) == 300 and tokenizer.eos_token == END_OF_TEXT
    text = "ROMEO: I love the moon — ünïcödé never seen 🌙\n"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    served = tokenizer(text)["input_ids"]  # a served prompt starts as every training document does
    assert served[0] == tokenizer.eos_token_id and tokenizer.decode(served, skip_special_tokens=True) == text
    stream = encode_documents(tokenizer, ["ROMEO: I fear", "a rose"])
    eos = tokenizer.eos_token_id
    assert stream.ids[0] == eos and stream.ids[-1] == eos and int((stream.ids == eos).sum()) == 3
    assert (stream.characters, stream.utf8_bytes) == (19, 19)


def test_positions_restart_at_each_end_of_text() -> None:
    ids = torch.tensor([[5, 6, 0, 7, 8, 0, 9], [1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 0, 0, 4]])
    expected = [[0, 1, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 0, 0, 1]]
    assert positions(ids, eos=0).tolist() == expected


# -- training through the one loop ----------------------------------------------------------------
@pytest.fixture
def one_thread() -> Iterator[None]:
    """Products of a 32-wide model gain nothing from a second thread, and on a loaded machine a
    second OpenMP thread's waiting made each one 30 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(
    tmp: Path,
    control: Callable[[], str | None] = lambda: None,
    events: list[dict] | None = None,
    *,
    epochs: int = 3,
    lines: int = 1200,
    checkpoint: Callable[[int, int, dict, Path], None] = lambda *a: None,
    checkpoints: CheckpointSource | None = None,
) -> TrainingResult:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "corpus.txt").write_text(corpus(lines))
    spec = TrainingSpec(
        n_epochs=epochs, batch_size=8, adapter="full", max_seq_length=32, warmup_ratio=0.1, lr_scheduler="cosine"
    )
    spec = TrainingSpec(
        **{
            **spec.as_dict(),
            "method": "pretrain",
            "gradient_accumulation_steps": 2,
            "learning_rate_multiplier": 5.0,
            "weight_decay": 0.1,
        }
    )
    pretrain = PretrainSpec(model="llama", dims=ModelDims(**TINY), tokenizer="bpe", vocab_size=300, sample_tokens=12)
    log = events if events is not None else []
    hooks = Hooks(
        metrics=log.append,
        message=lambda m: log.append({"message": m}),
        checkpoint=checkpoint,
        control=control,
    )
    run = TrainingRun(
        tmp, tmp / "corpus.txt", None, spec, seed=3, work_dir=tmp / "work", hooks=hooks, bf16=False,
        pretrain=PretrainInputs(spec=pretrain), checkpoints=checkpoints,
    )  # fmt: skip
    return run_pretrain(run)


@pytest.mark.usefixtures("one_thread")
def test_pretraining_lowers_the_loss_and_reports_per_character(tmp_path: Path) -> None:
    events: list[dict] = []
    result = _run(tmp_path, events=events)
    losses = [e["train_loss"] for e in events if "train_loss" in e]
    assert losses[-1] < losses[0] * 0.6
    valid = [e for e in events if "valid_loss_per_char" in e]
    assert len(valid) == 3 and valid[-1]["valid_loss"] < valid[0]["valid_loss"] < 3.0
    last = valid[-1]
    # The same held-out nats counted per token, per character and per byte (ASCII: one byte a character).
    assert last["valid_loss_per_char"] < last["valid_loss"]
    assert last["valid_bits_per_byte"] == pytest.approx(last["valid_loss_per_char"] / 0.6931471805599453)
    assert sum(1 for e in events if str(e.get("message", "")).startswith("Sample: ")) == 3
    assert any("Held out" in str(e.get("message")) for e in events)
    config = json.loads((result.model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["hidden_size"] == 32
    assert (result.model_dir / "tokenizer.json").is_file()
    assert result.metrics["best_epoch"] == 3


@pytest.mark.usefixtures("one_thread")
def test_a_resumed_pretraining_run_ends_with_the_weights_of_an_unstopped_one(tmp_path: Path) -> None:
    straight = _run(tmp_path / "a", epochs=2, lines=600)
    checkpoint, after = tmp_path / "b" / "work" / "ckpt-epoch-1", iter(range(10_000))

    def pause_in_epoch_2() -> str | None:  # a few batches into epoch 2, after the epoch-1 checkpoint
        return "pause" if checkpoint.is_dir() and next(after) == 3 else None

    with pytest.raises(Stopped):
        _run(tmp_path / "b", control=pause_in_epoch_2, epochs=2, lines=600)
    assert checkpoint.is_dir()
    assert not (tmp_path / "b" / "work" / "ckpt-epoch-2").exists()
    resumed = _run(tmp_path / "b", epochs=2, lines=600)
    a, b = load_file(straight.model_dir / "model.safetensors"), load_file(resumed.model_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


@pytest.mark.usefixtures("one_thread")
def test_a_run_resumed_on_another_node_takes_the_tokenizer_stored_with_its_checkpoint(
    tmp_path: Path, loaded_platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node A trains a BPE and epoch 1, and is lost; node B, its work directory empty, resumes from
    the artifact store with the very tokenizer the restored weights were trained with."""
    from llmos.kernel.job_checkpoints import JobCheckpoints
    from llmos.training.job_training import StoredCheckpoints
    from tests.fine_tune_jobs import running_job

    p = loaded_platform
    job_id = running_job(p)

    def record(step: int, epoch: int, metrics: dict, path: Path) -> None:
        stored = p.jobs.stored_checkpoints
        assert stored.record(job_id, 1, step=step, epoch=epoch, metrics=metrics, directory=path, leave_out=(SERVABLE,))

    def on(node: Path) -> StoredCheckpoints:
        return StoredCheckpoints(p.jobs.stored_checkpoints, job_id, node / "work")

    node_a, node_b, after = tmp_path / "a", tmp_path / "b", iter(range(10_000))

    def pause_in_epoch_2() -> str | None:
        return "pause" if (node_a / "work" / "ckpt-epoch-1").is_dir() and next(after) == 3 else None

    with pytest.raises(Stopped):
        _run(node_a, pause_in_epoch_2, epochs=2, lines=600, checkpoint=record, checkpoints=on(node_a))
    trained = (node_a / "work" / TOKENIZER_DIR / "tokenizer.json").read_bytes()
    shutil.rmtree(node_a)  # the node and its disk are gone

    def train_bpe_again(*args: object) -> None:
        raise AssertionError("trained a tokenizer again: it matches the restored weights only by chance")

    monkeypatch.setattr(pretraining, "train_bpe", train_bpe_again)
    restores: list[int] = []
    real_restore = JobCheckpoints.restore

    def counted(checkpoints: JobCheckpoints, job: str, epoch: int, target: Path) -> Path:
        restores.append(epoch)
        return real_restore(checkpoints, job, epoch, target)

    monkeypatch.setattr(JobCheckpoints, "restore", counted)
    events: list[dict] = []
    result = _run(node_b, events=events, epochs=2, lines=600, checkpoint=record, checkpoints=on(node_b))
    assert restores[:1] == [1] and restores.count(1) == 1, "the checkpoint resumed from is restored once"
    assert any(str(e.get("message", "")).startswith("Resumed from checkpoint") for e in events)
    assert (node_b / "work" / TOKENIZER_DIR / "tokenizer.json").read_bytes() == trained
    served = json.loads((result.model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    assert served == json.loads(trained)["model"]["vocab"]


@pytest.mark.usefixtures("one_thread")
def test_a_pretrained_model_registers_as_a_completion_model_and_completes(
    tmp_path: Path, loaded_platform: Platform, client: openai.OpenAI
) -> None:
    result = _run(tmp_path, epochs=2, lines=600)
    record = loaded_platform.registry.pull(f"file:{result.model_dir}", name="pretrained-verse")
    assert record.task == "completion"  # no chat template: a base model
    reply = client.completions.create(model="pretrained-verse", prompt="ROMEO: I", max_tokens=6, temperature=0)
    assert reply.choices[0].text.strip() and reply.usage is not None and reply.usage.completion_tokens == 6
    # The served prompt starts as training documents do, so the model continues the corpus's grammar.
    assert reply.choices[0].text.startswith((" loves", " fears", " keeps", " seeks"))


# -- the API --------------------------------------------------------------------------------------
def _upload(client: openai.OpenAI, text: str | bytes, name: str = "corpus.txt") -> str:
    data = text.encode() if isinstance(text, str) else text
    return client.files.create(file=(name, data), purpose="pretrain").id  # type: ignore[arg-type]


def _pretrain(**options: object) -> dict:
    return {"type": "pretrain", "pretrain": {"architecture": TINY, **options}}


P = "method.pretrain"
BUDGET = "exceeds_memory_budget"
HUGE = {**TINY, "hidden_size": 8192, "num_hidden_layers": 128}


@pytest.mark.parametrize(
    ("model", "method", "param", "code"),
    [
        ("llama-huge", _pretrain(), "model", "unsupported_model"),
        ("llama", {"type": "pretrain"}, f"{P}.architecture.hidden_size", None),
        ("llama", _pretrain(architecture={**TINY, "num_attention_heads": 3}), f"{P}.architecture.hidden_size", None),
        ("llama-tiny", _pretrain(tokenizer={"type": "bpe", "vocab_size": 100}), f"{P}.tokenizer.vocab_size", None),
        ("llama-tiny", _pretrain(tokenizer={"type": "bpe", "vocab_size": 262144}), f"{P}.tokenizer", BUDGET),
        ("llama", _pretrain(architecture=HUGE), f"{P}.architecture", BUDGET),
        (
            "llama-tiny",
            _pretrain(tokenizer={"type": "model", "model": "nope"}),
            f"{P}.tokenizer.model",
            "model_not_found",
        ),
        ("llama-tiny", _pretrain(tokenizer={"type": "model", "model": "tiny-embed"}), f"{P}.tokenizer.model", None),
        ("llama-tiny", _pretrain(unknown=1), f"{P}.unknown", None),
        ("llama-tiny", _pretrain(training_files=["file-" + "0" * 24]), f"{P}.training_files[0]", "invalid_file"),
        ("llama-tiny", {"type": "pretrain", "supervised": {}}, "method.supervised", None),
    ],
)
def test_a_bad_pretraining_job_is_refused_before_it_is_queued(
    client: openai.OpenAI, model: str, method: dict, param: str, code: str | None
) -> None:
    training = _upload(client, corpus(50))
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model=model, training_file=training, method=method)  # type: ignore[arg-type]
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == param, error
    if code is not None:
        assert error["code"] == code
    assert client.fine_tuning.jobs.list().data == []  # nothing half-written


def test_a_pretraining_job_takes_only_valid_text_corpora(client: openai.OpenAI, http: TestClient) -> None:
    binary = _upload(client, b"\x7fELF\x02\x01\x01\x00\x00", "a.out")
    assert client.files.retrieve(binary).status == "error"
    chat = client.files.create(
        file=("chat.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()), purpose="fine-tune"
    ).id
    good = _upload(client, corpus(50))
    for body, param in [
        ({"training_file": binary}, "training_file"),
        ({"training_file": chat}, "training_file"),
        ({"training_file": good, "validation_file": binary}, "validation_file"),
        (
            {"training_file": good, "validation_file": good, "method": _pretrain(validation_split=0.2)},
            f"{P}.validation_split",
        ),
    ]:
        answer = http.post(
            "/v1/fine_tuning/jobs",
            json={"model": "llama", "method": _pretrain(), **body},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        )
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.json()
    assert client.fine_tuning.jobs.list().data == []


def test_a_corpus_too_large_for_the_memory_budget_is_refused(loaded_platform: Platform) -> None:
    p = loaded_platform
    store = JobStore(p.db, p.files, p.registry, pretrain_memory_mb=16)
    big, _ = p.files.create(
        tenant="default", purpose="pretrain", filename="big.txt", chunks=[corpus(80_000).encode()], max_bytes=1 << 24
    )
    small = _pretrain(
        tokenizer={"type": "bpe", "vocab_size": 300}, max_seq_length=32, hyperparameters={"batch_size": 1}
    )
    body = {"model": "llama", "training_file": big.id, "method": small}
    with pytest.raises(InvalidRequestError, match=r"would need about \d+ MiB") as caught:
        store.create(tenant="default", body=body)
    assert caught.value.param == "training_file" and caught.value.code == BUDGET
    assert store.list("default")[0] == []


@pytest.mark.slow
def test_a_pretraining_job_registers_a_model_that_completes_text(
    quiet_client: openai.OpenAI, supervisor: JobSupervisor, loaded_platform: Platform
) -> None:
    first, second = _upload(quiet_client, corpus(600, seed=1)), _upload(quiet_client, corpus(600, seed=2))
    method = _pretrain(
        training_files=[second],
        tokenizer={"type": "bpe", "vocab_size": 300},
        max_seq_length=32,
        hyperparameters={"n_epochs": 2, "batch_size": 8},
        samples={"prompts": ["ROMEO:"], "max_tokens": 8},
    )
    job = quiet_client.fine_tuning.jobs.create(model="llama", training_file=first, method=method, suffix="verse")  # type: ignore[arg-type]
    assert job.status == "queued" and job.method.type == "pretrain"  # type: ignore[union-attr,comparison-overlap]
    drive(
        supervisor, quiet_client, job.id, lambda: quiet_client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"
    )
    done = quiet_client.fine_tuning.jobs.retrieve(job.id)
    name = str(done.fine_tuned_model)
    assert name.startswith("pt:llama:default:verse:")
    events = quiet_client.fine_tuning.jobs.list_events(job.id, limit=200).data
    assert any(e.message.startswith("Sample: ROMEO:") for e in events)
    assert any("valid_loss_per_char" in (e.data or {}) for e in events)  # type: ignore[operator]
    model = quiet_client.models.retrieve(name).model_dump()
    files = {f.id: f.model_dump()["sha256"] for f in quiet_client.files.list().data}
    assert model["parent"] is None and model["extra"]["corpus_sha256"] == [files[first], files[second]]
    assert model["extra"]["metrics"]["valid_loss_per_char"] > 0
    reply = quiet_client.completions.create(model=name, prompt="ROMEO: I", max_tokens=8, temperature=0)
    assert reply.choices[0].text  # a base model: plain completions


def test_the_loss_curve_draws_the_last_reports_over_their_range() -> None:
    assert loss_curve([3.0, 2.0, 1.0]) == "█▅▁ 3.000..1.000"
    assert loss_curve([float(v) for v in range(100)], width=3) == "▁▅█ 99.000..97.000"
    assert loss_curve([2.0, 2.0]) == "▁▁ 2.000..2.000" and loss_curve([]) == ""
