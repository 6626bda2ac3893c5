"""Sequence packing for chat fine-tuning: rows hold whole conversations, and a packed row computes
exactly what its conversations compute alone."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmos.training.chat_data import Example, load_chat_file
from llmos.training.packing import pack
from llmos.training.sft import _loss_and_accuracy
from tests.unit.test_fine_tuning import upload, wait_for


def _examples(tiny_chat_dir: Path, tmp_path: Path) -> list[Example]:
    rows = [
        {
            "messages": [
                {"role": "user", "content": "word " * (i % 5 + 1)},
                {"role": "assistant", "content": "Paris is the capital " * (i % 3 + 1)},
            ]
        }
        for i in range(9)
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return load_chat_file(path, AutoTokenizer.from_pretrained(tiny_chat_dir), 256)


def test_rows_hold_whole_conversations_within_the_length(tiny_chat_dir: Path, tmp_path: Path) -> None:
    examples = _examples(tiny_chat_dir, tmp_path)
    longest = max(len(e.input_ids) for e in examples)
    rows = pack(examples, 2 * longest)
    assert len(rows) < len(examples)
    assert all(len(r.input_ids) <= 2 * longest for r in rows)
    assert sorted(len(e.input_ids) for e in examples) == sorted(
        n for r in rows for n in _segment_lengths(r.position_ids or [])
    )
    assert sum(len(r.input_ids) for r in rows) == sum(len(e.input_ids) for e in examples)


def _segment_lengths(positions: list[int]) -> list[int]:
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    return [b - a for a, b in itertools.pairwise(starts)]


def test_a_packed_batch_computes_what_the_conversations_compute_alone(tiny_chat_dir: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()
    examples = _examples(tiny_chat_dir, tmp_path)
    rows = pack(examples, 3 * max(len(e.input_ids) for e in examples))
    with torch.no_grad():
        alone, correct_alone, counted_alone = _loss_and_accuracy(model, examples, 0, False)
        packed, correct_packed, counted_packed = _loss_and_accuracy(model, rows, 0, False)
        # The same rows without restarting positions: one long conversation, which is not the same.
        flat = [Example(r.input_ids, r.labels) for r in rows]
        mixed, _, _ = _loss_and_accuracy(model, flat, 0, False)
    assert counted_packed == counted_alone and correct_packed == correct_alone
    assert packed.item() == pytest.approx(alone.item(), abs=1e-5)
    assert abs(mixed.item() - alone.item()) > 1e-4


@pytest.mark.slow
def test_a_packed_job_trains_and_bad_settings_are_refused(client: openai.OpenAI) -> None:
    training = upload(client)
    for supervised, param in (
        ({"packing": "yes"}, "method.supervised.packing"),
        ({"packing": True, "adapter": {"type": "prompt_tuning"}}, "method.supervised.packing"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client.fine_tuning.jobs.create(
                model="tiny-chat", training_file=training, method={"type": "supervised", "supervised": supervised}
            )  # type: ignore[arg-type]
        assert refused.value.body["param"] == param  # type: ignore[index]
    method = {"type": "supervised", "supervised": {"packing": True, "hyperparameters": {"n_epochs": 1}}}
    job = client.fine_tuning.jobs.create(model="tiny-chat", training_file=training, method=method)  # type: ignore[arg-type]
    done = wait_for(client, job.id, {"succeeded", "failed"})
    assert done.status == "succeeded", done.error  # type: ignore[attr-defined]
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any(m.startswith("Packed 12 conversations into") for m in messages)


def _padding(batches: list[list[Example]]) -> int:
    return sum(len(b) * max(len(e.input_ids) for e in b) - sum(len(e.input_ids) for e in b) for b in batches)


def test_length_grouped_batches_pad_less_and_keep_every_example_once() -> None:
    import random

    from llmos.training.loop import shuffled_batches

    examples = [Example(input_ids=[1] * n, labels=[1] * n) for n in random.Random(0).choices(range(5, 200), k=300)]

    def length(e: Example) -> int:
        return len(e.input_ids)

    plain = shuffled_batches(examples, 8, random.Random(1))
    grouped = shuffled_batches(examples, 8, random.Random(1), length)
    assert sorted(id(e) for b in grouped for e in b) == sorted(id(e) for e in examples)
    assert all(len(b) <= 8 for b in grouped)
    assert _padding(grouped) < 0.2 * _padding(plain)
    assert grouped == shuffled_batches(examples, 8, random.Random(1), length)  # the same order on resume
    assert [len(b[0].input_ids) for b in grouped] != sorted(len(b[0].input_ids) for b in grouped)  # batches shuffled


def test_classification_pairs_are_grouped_by_the_length_of_both_texts() -> None:
    """A cross-encoder's examples are short questions with passages of any length: grouping must
    count the passage, or every batch pads to its longest passage."""
    import random

    from llmos.training.classify import ClassificationTask, LabelledText
    from llmos.training.loop import shuffled_batches

    draw = random.Random(0)
    examples = [
        LabelledText("where is it? " + "x" * draw.randrange(5), "1", "passage " * draw.randrange(3, 80))
        for _ in range(300)
    ]

    def padding(batches: list[list[LabelledText]]) -> int:
        sizes = [[len(e.text) + len(e.text_pair or "") for e in b] for b in batches]
        return sum(len(s) * max(s) - sum(s) for s in sizes)

    plain = shuffled_batches(examples, 8, random.Random(1))
    grouped = shuffled_batches(examples, 8, random.Random(1), ClassificationTask.length)
    assert sorted(id(e) for b in grouped for e in b) == sorted(id(e) for e in examples)
    assert padding(grouped) < 0.2 * padding(plain)


def test_ner_sentences_are_grouped_by_the_length_of_their_words() -> None:
    """``group_by_length`` on a token-classification job batches sentences of like length."""
    import random

    from llmos.training.loop import shuffled_batches
    from llmos.training.ner import TaggedSentence, TokenClassificationTask

    assert TokenClassificationTask.length is not None  # the job honours the flag
    draw = random.Random(0)
    sentences = [
        TaggedSentence(tuple("word" for _ in range(n)), tuple("O" for _ in range(n)))
        for n in (draw.randrange(1, 60) for _ in range(300))
    ]

    def padding(batches: list[list[TaggedSentence]]) -> int:
        sizes = [[len(s.tokens) for s in b] for b in batches]
        return sum(len(s) * max(s) - sum(s) for s in sizes)

    plain = shuffled_batches(sentences, 8, random.Random(1))
    grouped = shuffled_batches(sentences, 8, random.Random(1), TokenClassificationTask.length)
    assert sorted(id(s) for b in grouped for s in b) == sorted(id(s) for s in sentences)
    assert padding(grouped) < 0.2 * padding(plain)
