"""Data augmentation (EDA with the model's own embedding neighbours) and adversarial training
(FGM on the input embeddings): what they change, that they are deterministic, and their switches."""

from __future__ import annotations

import json
import random
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from llmos.training.adversarial import FGM
from llmos.training.augment import augment, eda, embedding_synonyms
from tests.unit.test_fine_tuning import upload, wait_for


class _Vocab:
    def __init__(self, words: list[str]) -> None:
        self.vocab = {w: i for i, w in enumerate(words)}

    def get_vocab(self) -> dict[str, int]:
        return self.vocab


def test_synonyms_are_the_nearest_whole_words_in_embedding_space() -> None:
    tokenizer = _Vocab(["good", "great", "awful", "##ing", "a", "terrible"])
    embeddings = torch.tensor(
        [[1.0, 0.1], [0.9, 0.2], [-1.0, 0.1], [1.0, 0.1], [1.0, 0.1], [-0.9, 0.2]]  # "##ing" and "a" never chosen
    )
    synonyms = embedding_synonyms({"good", "awful", "missing"}, tokenizer, embeddings)
    assert synonyms == {"good": "great", "awful": "terrible"}


def test_eda_is_deterministic_and_keeps_labels() -> None:
    examples = [("the film was good and the actors were great", "pos"), ("an awful boring film", "neg")] * 3
    synonyms = {"good": "great", "awful": "terrible", "film": "movie"}

    def run(seed: int) -> list[tuple[str, str]]:
        return augment(examples, lambda x: x[0], lambda x, t: (t, x[1]), synonyms, probability=0.3, copies=2, seed=seed)

    first = run(7)
    assert first == run(7) and first != run(8)
    assert first[: len(examples)] == examples
    variants = first[len(examples) :]
    assert 0 < len(variants) <= 2 * len(examples)
    assert all(v[0] not in {e[0] for e in examples} for v in variants)
    assert {v[1] for v in variants if "awful" in v[0] or "terrible" in v[0] or "boring" in v[0]} <= {"neg"}


def test_eda_touches_words_with_the_given_probability() -> None:
    text = " ".join(f"w{i}" for i in range(2000))
    changed = eda(text, {}, 0.1, random.Random(0)).split()
    deleted = 2000 - len(changed)
    assert 30 < deleted < 110  # a tenth of the words touched, a third of those deleted: about 67
    assert set(changed) <= set(text.split()) and changed != text.split()[: len(changed)]


def test_fgm_adds_the_perturbed_batchs_gradient(tiny_chat_dir: Path) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32)
    ids = torch.randint(0, 100, (2, 10))
    weights = model.get_input_embeddings().weight.detach().clone()

    def loss() -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    loss().backward()
    plain = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    fgm = FGM(model, epsilon=1.0)
    loss().backward()
    first = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    fgm.attack(loss)
    attacked = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.allclose(a, b) for a, b in zip(plain, first, strict=True))  # the hook alone changes nothing
    assert any(not torch.allclose(a, b) for a, b in zip(first, attacked, strict=True))
    assert torch.equal(model.get_input_embeddings().weight, weights)  # the weights themselves are never moved
    with torch.no_grad():
        model(input_ids=ids)
    assert fgm._captured is None  # evaluation passes are not recorded
    fgm.remove()


@pytest.mark.slow
def test_switches_are_validated_and_a_robust_classifier_trains(client: openai.OpenAI) -> None:
    chat = upload(client)
    rows = [{"text": "hello how are you today", "label": "greeting"}, {"text": "paris is in france", "label": "fact"}]
    data = "\n".join(json.dumps(r) for r in rows * 8).encode()
    training = client.files.create(file=("cls.jsonl", data), purpose="fine-tune").id
    cases = [
        ("tiny-embed", training, {"adversarial": {"type": "pgd"}}, "method.supervised.adversarial"),
        (
            "tiny-embed",
            training,
            {"adversarial": {"type": "fgm", "epsilon": -1}},
            "method.supervised.adversarial.epsilon",
        ),
        (
            "tiny-embed",
            training,
            {"augmentation": {"type": "eda", "probability": 2}},
            "method.supervised.augmentation.probability",
        ),
        (
            "tiny-embed",
            training,
            {"augmentation": {"type": "eda", "copies": 99}},
            "method.supervised.augmentation.copies",
        ),
        ("tiny-chat", chat, {"augmentation": {"type": "eda"}}, "method.supervised.augmentation"),
    ]
    for model, file_id, supervised, param in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            client.fine_tuning.jobs.create(
                model=model, training_file=file_id, method={"type": "supervised", "supervised": supervised}
            )  # type: ignore[arg-type]
        assert refused.value.body["param"] == param, refused.value.body  # type: ignore[index]
    supervised = {
        "hyperparameters": {"n_epochs": 2, "batch_size": 4},
        "adapter": {"type": "full"},
        "augmentation": {"type": "eda", "probability": 0.3, "copies": 2},
        "adversarial": {"type": "fgm", "epsilon": 0.5},
    }
    job = client.fine_tuning.jobs.create(
        model="tiny-embed", training_file=training, method={"type": "supervised", "supervised": supervised}
    )  # type: ignore[arg-type]
    done = wait_for(client, job.id, {"succeeded", "failed"})
    assert done.status == "succeeded", done.error  # type: ignore[attr-defined]
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any(m.startswith("Augmented 16 training examples with") for m in messages), messages
