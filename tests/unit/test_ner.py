"""NER end to end on the tiny BERT: label alignment, entity metrics, BIO span grouping, the
trainer (full / LoRA / IA3, seeds, resume), a job through the real supervisor and worker, and
POST /v1/ner with character offsets checked on the real tokenizer's text and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from llmos.engine.torch_backend.token_classifier import TaggedWord, group_entities, split_tag
from llmos.platform import Platform
from llmos.registry.tables import ModelRow
from llmos.training.classify import run_classification
from llmos.training.datasets import validate_dataset
from llmos.training.ner import IGNORE, align_labels, entity_report, load_token_file, run_token_classification
from llmos.training.run import Hooks, Stopped, TrainingRun
from llmos.training.spec import TrainingSpec
from tests.conftest import ADMIN_KEY
from tests.unit.test_api_security import _tenant_key
from tests.unit.test_fine_tuning import wait_for

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SHARED = Path(__file__).resolve().parents[3] / "shared" / "datasets"
SENTENCES = [
    (["the", "capital", "of", "france", "is", "paris", "."], ["O", "O", "O", "B-LOC", "O", "B-LOC", "O"]),
    (["a", "quick", "brown", "fox", "jumps", "."], ["O", "B-ANIMAL", "I-ANIMAL", "I-ANIMAL", "O", "O"]),
    (["hello", "how", "are", "you", "today", "?"], ["O"] * 6),
]
ROWS = [{"tokens": tokens, "tags": tags} for tokens, tags in SENTENCES]


def _jsonl(rows: list[dict]) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


# -- tags, spans and metrics ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("tag", "split"),
    [("O", ("O", None)), ("B-PER", ("B", "PER")), ("I-loc", ("I", "loc")), ("S_X", ("S", "X")), ("PER", ("I", "PER"))],
)
def test_split_tag(tag: str, split: tuple[str, str | None]) -> None:
    assert split_tag(tag) == split


def _words(text: str, tags: list[str]) -> list[TaggedWord]:
    out, at = [], 0
    for word, tag in zip(text.split(), tags, strict=True):
        start = text.index(word, at)
        at = start + len(word)
        out.append(TaggedWord(tag, 0.5 if tag == "O" else 0.9, start, at))
    return out


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        (["B-PER", "I-PER", "O", "B-LOC"], [("PER", "Ann  Lee"), ("LOC", "Rome")]),
        (["B-PER", "B-PER", "O", "O"], [("PER", "Ann"), ("PER", "Lee")]),  # B- always starts one
        (["I-PER", "I-PER", "I-LOC", "O"], [("PER", "Ann  Lee"), ("LOC", "in")]),  # a stray I- starts one (conlleval)
        (["S-PER", "B-LOC", "E-LOC", "O"], [("PER", "Ann"), ("LOC", "Lee in")]),  # BIOES
        (["PER", "PER", "O", "LOC"], [("PER", "Ann  Lee"), ("LOC", "Rome")]),  # plain tags
        (["O", "O", "O", "O"], []),
    ],
)
def test_bio_tags_group_into_entities(tags: list[str], expected: list[tuple[str, str]]) -> None:
    text = " Ann  Lee in Rome"
    entities = group_entities(text, _words(text, tags))
    assert [(e.entity, e.text) for e in entities] == expected
    assert all(text[e.start : e.end] == e.text and e.score == pytest.approx(0.9) for e in entities)


def test_entity_report_scores_whole_entities() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG"]]
    predicted = [["B-PER", "I-PER", "O", "O"], ["O", "B-ORG", "O"]]  # PER right, LOC missed, ORG cut short
    report = entity_report(gold, predicted)
    assert report["precision"] == pytest.approx(1 / 2)
    assert report["recall"] == pytest.approx(1 / 3)
    assert report["f1"] == pytest.approx(0.4)
    assert report["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert report["per_type"]["LOC"]["recall"] == 0.0 and report["per_type"]["ORG"]["support"] == 1
    assert entity_report(gold, gold)["f1"] == 1.0


def test_labels_sit_on_the_first_sub_word(tiny_encoder_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    words = ["paris", "antidisestablishment", "fox"]
    enc = tokenizer([words], is_split_into_words=True)
    word_ids = enc.word_ids(0)
    assert word_ids.count(1) > 1  # the long word is cut into several pieces
    labels = align_labels(word_ids, [7, 8, 9])
    first = {w: word_ids.index(w) for w in range(3)}
    assert [labels[first[w]] for w in range(3)] == [7, 8, 9]
    assert all(label == IGNORE for i, label in enumerate(labels) if i not in first.values())


def test_token_files_load_from_jsonl_and_conll(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(_jsonl(ROWS))
    (tmp_path / "a.conll").write_text(
        "\n\n".join("\n".join(f"{w}\t{t}" for w, t in zip(*s, strict=True)) for s in SENTENCES) + "\n"
    )
    for name in ("a.jsonl", "a.conll"):
        loaded = load_token_file(tmp_path / name)
        assert [(list(s.tokens), list(s.tags)) for s in loaded] == [(list(w), list(t)) for w, t in SENTENCES]
    wnut = SHARED / "wnut17" / "dev.conll"
    assert len(load_token_file(wnut)) == validate_dataset(wnut).records == 1009


# -- the trainer ----------------------------------------------------------------------------
def _train(encoder: Path, tmp: Path, spec: TrainingSpec, control: object = lambda: None) -> tuple[object, list]:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "train.jsonl").write_bytes(_jsonl(ROWS * 4))
    log: list = []
    hooks = Hooks(metrics=log.append, message=lambda m: None, checkpoint=lambda *a: log.append(a), control=control)  # type: ignore[arg-type]
    result = run_token_classification(
        TrainingRun(
            base_dir=encoder,
            train_path=tmp / "train.jsonl",
            valid_path=tmp / "train.jsonl",
            spec=spec,
            seed=7,
            work_dir=tmp / "work",
            hooks=hooks,
            bf16=False,
        )
    )
    return result, log


@pytest.mark.parametrize("adapter", ["lora", "ia3"])
def test_peft_methods_train_a_token_classifier(tiny_encoder_dir: Path, tmp_path: Path, adapter: str) -> None:
    from transformers import AutoModelForTokenClassification

    spec = TrainingSpec(n_epochs=2, batch_size=4, adapter=adapter)
    result, log = _train(tiny_encoder_dir, tmp_path, spec)
    assert {"valid_f1", "valid_precision", "valid_recall", "valid_report", "best_epoch"} <= set(result.metrics)  # type: ignore[attr-defined]
    assert any("train_loss" in m for m in log if isinstance(m, dict))
    model = AutoModelForTokenClassification.from_pretrained(result.model_dir)  # type: ignore[attr-defined]
    assert set(model.config.id2label.values()) == {"O", "B-LOC", "B-ANIMAL", "I-ANIMAL"}
    assert not any("lora" in n or "ia3" in n for n, _ in model.named_parameters())  # merged into plain weights


@pytest.mark.slow
def test_seeded_runs_match_and_a_stopped_run_resumes_to_the_same_weights(
    tiny_encoder_dir: Path, tmp_path: Path
) -> None:
    spec = TrainingSpec(n_epochs=2, batch_size=4, adapter="full", learning_rate_multiplier=50)
    first, _ = _train(tiny_encoder_dir, tmp_path / "a", spec)
    second, _ = _train(tiny_encoder_dir, tmp_path / "b", spec)
    steps = iter(range(1000))
    with pytest.raises(Stopped):  # paused during epoch 2, after the epoch-1 checkpoint
        _train(tiny_encoder_dir, tmp_path / "c", spec, control=lambda: "pause" if next(steps) == 5 else None)
    assert (tmp_path / "c" / "work" / "ckpt-epoch-1").is_dir()
    resumed, _ = _train(tiny_encoder_dir, tmp_path / "c", spec)
    weights = [load_file(r.model_dir / "model.safetensors") for r in (first, second, resumed)]  # type: ignore[attr-defined]
    assert weights[0].keys() == weights[1].keys() == weights[2].keys()
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name
        assert torch.equal(value, weights[2][name]), name


def test_a_task_head_of_another_shape_is_started_afresh(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    """Fine-tuning a fine-tuned encoder again: its 3-tag NER head gives way to the new task's head."""
    from transformers import AutoModelForSequenceClassification

    base = _fixed_tagger(tiny_encoder_dir, tmp_path / "tagger", "O")
    ner, _ = _train(base, tmp_path / "ner", TrainingSpec(n_epochs=1, batch_size=4, adapter="full"))
    assert len(json.loads((ner.model_dir / "config.json").read_text())["id2label"]) == 4  # type: ignore[attr-defined]
    (tmp_path / "cls.jsonl").write_bytes(_jsonl([{"text": "hello", "label": "a"}, {"text": "paris", "label": "b"}] * 4))
    result = run_classification(
        TrainingRun(
            base_dir=base,
            train_path=tmp_path / "cls.jsonl",
            valid_path=None,
            spec=TrainingSpec(n_epochs=1, batch_size=4, adapter="full"),
            seed=0,
            work_dir=tmp_path / "cls",
            hooks=Hooks(
                metrics=lambda m: None, message=lambda m: None, checkpoint=lambda *a: None, control=lambda: None
            ),
            bf16=False,
        )
    )
    assert AutoModelForSequenceClassification.from_pretrained(result.model_dir).config.num_labels == 2


# -- a job through the supervisor and worker, then POST /v1/ner ------------------------------
@pytest.mark.slow
def test_ner_fine_tune_then_extract_entities(client: openai.OpenAI, http: TestClient) -> None:
    training = client.files.create(file=("ner.jsonl", _jsonl(ROWS * 8)), purpose="fine-tune")
    assert training.format == "token-classification"  # type: ignore[attr-defined]
    chat = client.files.create(
        file=("chat.jsonl", _jsonl([{"messages": [{"role": "assistant", "content": "x"}]}])), purpose="fine-tune"
    )
    with pytest.raises(openai.BadRequestError) as mixed:  # validation data of another format than the training file
        client.fine_tuning.jobs.create(model="tiny-embed", training_file=training.id, validation_file=chat.id)
    assert mixed.value.body["param"] == "validation_file"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as on_chat:  # NER data on a causal model
        client.fine_tuning.jobs.create(model="tiny-chat", training_file=training.id)
    assert on_chat.value.body["param"] == "training_file"  # type: ignore[index]
    method = {
        "type": "supervised",
        "supervised": {
            "hyperparameters": {"n_epochs": 6, "batch_size": 4, "learning_rate_multiplier": 100},
            "adapter": {"type": "full"},
            "lr_scheduler": "constant",
        },
    }
    job = client.fine_tuning.jobs.create(
        model="tiny-embed", training_file=training.id, validation_file=training.id, method=method, suffix="ner", seed=3
    )  # type: ignore[arg-type]
    done = wait_for(client, job.id, {"succeeded", "failed"})
    events = client.fine_tuning.jobs.list_events(job.id, limit=200).data
    assert done.status == "succeeded", (done.error, [e.message for e in events])  # type: ignore[attr-defined]
    name = done.fine_tuned_model  # type: ignore[attr-defined]
    model = client.models.retrieve(name)
    assert model.task == "token-classification"  # type: ignore[attr-defined]
    lineage = model.extra["metrics"]  # type: ignore[attr-defined]
    assert lineage["valid_f1"] == 1.0 and set(lineage["valid_report"]) == {"LOC", "ANIMAL"}
    checkpoint = client.fine_tuning.jobs.checkpoints.list(job.id).data[0].model_dump()
    assert {"valid_f1", "valid_precision", "valid_recall", "valid_report"} <= set(checkpoint["metrics"])
    assert any(e.type == "metrics" and "valid_f1" in (e.data or {}) for e in events)

    text = "The capital of France is Paris."
    resp = http.post("/v1/ner", headers=ADMIN, json={"model": name, "input": [text, "Hello how are you today?"]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    found = [(e["entity"], e["text"], e["start"], e["end"]) for e in body["data"][0]["entities"]]
    assert found == [("LOC", "France", 15, 21), ("LOC", "Paris", 25, 30)]
    assert all(0.25 < e["score"] <= 1 for e in body["data"][0]["entities"]), body  # above chance (4 tags)
    assert body["data"][1]["entities"] == []
    assert body["usage"]["prompt_tokens"] > 0
    animal = http.post("/v1/ner", headers=ADMIN, json={"model": name, "input": "A quick brown fox jumps."}).json()
    assert [(e["entity"], e["text"]) for e in animal["data"][0]["entities"]] == [("ANIMAL", "quick brown fox")]


# -- serving: offsets on real tokenizer text, limits, isolation, bad input ------------------
def _fixed_tagger(encoder_dir: Path, root: Path, tag: str) -> Path:
    """A token classifier that gives every token ``tag``: its head is zero but for that bias."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tags = ["O", "B-MISC", "I-MISC"]
    model = AutoModelForTokenClassification.from_pretrained(
        encoder_dir, num_labels=3, id2label=dict(enumerate(tags)), label2id={t: i for i, t in enumerate(tags)}
    )
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.bias[tags.index(tag)] = 4.0
    model.save_pretrained(root, safe_serialization=True)
    AutoTokenizer.from_pretrained(encoder_dir).save_pretrained(root)
    return root


@pytest.fixture
def taggers(loaded_platform: Platform, tiny_encoder_dir: Path, tmp_path: Path) -> Platform:
    for tag, name in (("B-MISC", "tag-each-word"), ("I-MISC", "tag-one-span")):
        loaded_platform.registry.pull(f"file:{_fixed_tagger(tiny_encoder_dir, tmp_path / name, tag)}", name=name)
    return loaded_platform


def _ner(http: TestClient, body: dict, headers: dict = ADMIN) -> dict:
    resp = http.post("/v1/ner", headers=headers, json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


TEXTS = ["  The Café,  Zürich antidisestablishment!", "Paris\tis\nhere", "ÉCOLE  d'été 42"]


def test_offsets_point_into_the_input_as_written(taggers: Platform, http: TestClient) -> None:
    each = _ner(http, {"model": "tag-each-word", "input": TEXTS})["data"]
    for text, row in zip(TEXTS, each, strict=True):
        # Every word (BERT splits on spaces and punctuation) is its own entity, in the input's own case and accents.
        assert [e["text"] for e in row["entities"]] == text.replace(",", " , ").replace("!", " !").replace(
            "'", " ' "
        ).split()
        assert all(text[e["start"] : e["end"]] == e["text"] and e["entity"] == "MISC" for e in row["entities"])
        assert all(a["end"] <= b["start"] for a, b in zip(row["entities"], row["entities"][1:], strict=False))
    one = _ner(http, {"model": "tag-one-span", "input": TEXTS})["data"]
    for text, row in zip(TEXTS, one, strict=True):
        (entity,) = row["entities"]
        assert entity["text"] == text.strip() and text[entity["start"] : entity["end"]] == entity["text"]
        assert 0 < entity["score"] <= 1


def test_bad_ner_requests_get_the_openai_error_shape(taggers: Platform, http: TestClient) -> None:
    cases = [
        ({"model": "tiny-embed", "input": "x"}, 400, "model"),  # an encoder without an NER head
        ({"model": "tiny-chat", "input": "x"}, 400, "model"),
        ({"model": "no-such-model", "input": "x"}, 404, "model"),
        ({"model": "tag-each-word", "input": []}, 400, None),
        ({"model": "tag-each-word", "input": ["fine", "  "]}, 400, "input"),
        ({"model": "tag-each-word", "input": ["x"] * (taggers.settings.max_embedding_inputs + 1)}, 400, "input"),
        ({"model": "tag-each-word", "input": "word " * 200}, 400, "input"),  # beyond the model's 128 positions
        ({"model": "tag-each-word", "input": 3}, 400, None),
        ({"model": "tag-each-word", "input": ["x", 3]}, 400, None),
        ({"input": "x"}, 400, None),
    ]
    for body, status, param in cases:
        resp = http.post("/v1/ner", headers=ADMIN, json=body)
        assert resp.status_code == status, (body, resp.text)
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        if param:
            assert error["param"] == param, (body, error)
    assert http.post("/v1/ner", json={"model": "tag-each-word", "input": "x"}).status_code == 401


def test_a_tenants_ner_model_is_invisible_to_others(taggers: Platform, http: TestClient) -> None:
    with taggers.db.session() as s:
        s.get(ModelRow, taggers.registry.get("tag-one-span").id).owner = "owner-co"  # type: ignore[union-attr]
    owner = {"Authorization": f"Bearer {_tenant_key(http, 'owner-co')}"}
    stranger = {"Authorization": f"Bearer {_tenant_key(http, 'stranger')}"}
    body = {"model": "tag-one-span", "input": "Paris"}
    assert _ner(http, body, owner)["data"][0]["entities"][0]["text"] == "Paris"
    assert http.post("/v1/ner", headers=stranger, json=body).status_code == 404
    assert _ner(http, {"model": "tag-each-word", "input": "Paris"}, stranger)["data"][0]["entities"]  # shared model
