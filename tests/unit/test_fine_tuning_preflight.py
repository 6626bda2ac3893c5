"""Fine-tuning bodies are checked against the base model and the files before a job is queued:
what would otherwise fail only once a worker has started training is a 400 naming the param,
in the OpenAI error shape, and no job is left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import openai
import pytest

from llmos.errors import InvalidRequestError
from llmos.platform import Platform
from llmos.training.preflight import check_against_model
from llmos.training.spec import TrainingSpec

TARGETS = "method.supervised.adapter.target_modules"
CHAT = [
    {"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": "Paris."}]}
    for i in range(4)
]
LABELLED = [{"text": "hello there", "label": "greeting"}, {"text": "paris is in france", "label": "fact"}] * 2


def _upload(client: openai.OpenAI, rows: list[dict[str, Any]]) -> str:
    data = "\n".join(json.dumps(r) for r in rows).encode()
    return client.files.create(file=("data.jsonl", data), purpose="fine-tune").id


def _adapter(**adapter: Any) -> dict[str, Any]:
    return {"type": "supervised", "supervised": {"adapter": adapter}}


def _refused(client: openai.OpenAI, body: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as refused:
        client.post("/fine_tuning/jobs", body=body, cast_to=object)
    error = refused.value.body
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    return error


def test_target_modules_must_be_layers_of_the_base_model(client: openai.OpenAI) -> None:
    chat, labelled = _upload(client, CHAT), _upload(client, LABELLED)
    missing = _refused(
        client,
        {
            "model": "tiny-chat",
            "training_file": chat,
            "method": _adapter(type="lora", target_modules=["q_proj", "qkv"]),
        },
    )
    assert missing["param"] == TARGETS and "['qkv']" in missing["message"] and "q_proj" in missing["message"]
    container = _refused(
        client,
        {"model": "tiny-chat", "training_file": chat, "method": _adapter(type="lora", target_modules=["self_attn"])},
    )
    assert container["param"] == TARGETS  # a block of layers, not a layer an adapter can wrap
    embedding = _refused(
        client,
        {"model": "tiny-chat", "training_file": chat, "method": _adapter(type="lora", target_modules=["embed_tokens"])},
    )
    assert embedding["param"] == TARGETS and "linear" in embedding["message"]  # served adapters wrap linear layers
    peft_refuses = _refused(
        client,
        {
            "model": "tiny-chat",
            "training_file": chat,
            "method": _adapter(type="adalora", target_modules=["input_layernorm"]),
        },
    )
    assert peft_refuses["param"] == TARGETS and peft_refuses["code"] == "unsupported_method"
    head = _refused(
        client,
        {
            "model": "tiny-embed",
            "training_file": labelled,
            "method": _adapter(type="lora", target_modules=["classifier"]),
        },
    )
    assert head["param"] == TARGETS and "head" in head["message"]
    unused = _refused(
        client, {"model": "tiny-chat", "training_file": chat, "method": _adapter(type="ia3", target_modules=["q_proj"])}
    )
    assert unused["param"] == TARGETS  # IA3 would have ignored them silently
    assert client.fine_tuning.jobs.list().data == []


def test_files_and_virtual_tokens_that_would_fail_in_training_are_refused(client: openai.OpenAI) -> None:
    labelled = _upload(client, LABELLED)
    other_labels = _upload(client, [{"text": "what time is it", "label": "question"}, *LABELLED])
    unseen = _refused(client, {"model": "tiny-embed", "training_file": labelled, "validation_file": other_labels})
    assert unseen["param"] == "validation_file" and "question" in unseen["message"]
    too_many = _refused(
        client,
        {
            "model": "tiny-embed",
            "training_file": labelled,
            "method": _adapter(type="prompt_tuning", num_virtual_tokens=120),
        },
    )
    assert too_many["param"] == "method.supervised.adapter.num_virtual_tokens"  # the tiny encoder has 128 positions
    pairs = _upload(client, [{**row, "text_pair": "a passage"} for row in LABELLED])
    unpaired = _refused(client, {"model": "tiny-embed", "training_file": pairs, "validation_file": labelled})
    assert unpaired["param"] == "validation_file" and "text_pair" in unpaired["message"]
    assert client.fine_tuning.jobs.list().data == []


def test_a_chat_job_needs_a_chat_template(
    client: openai.OpenAI, loaded_platform: Platform, tiny_chat_dir: Path, tmp_path: Path
) -> None:
    plain = shutil.copytree(tiny_chat_dir, tmp_path / "plain")
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    loaded_platform.registry.pull(f"file:{plain}", name="tiny-plain")
    error = _refused(client, {"model": "tiny-plain", "training_file": _upload(client, CHAT)})
    assert error["param"] == "model" and "chat template" in error["message"]
    assert client.fine_tuning.jobs.list().data == []


@pytest.mark.parametrize(
    ("task", "spec"),
    [
        ("chat", TrainingSpec(adapter="lora", target_modules=["q_proj", "v_proj"])),
        ("chat", TrainingSpec(adapter="adalora", target_modules=["o_proj"])),
        ("chat", TrainingSpec(adapter="prefix_tuning")),
        ("chat", TrainingSpec(adapter="prompt_tuning")),
        ("chat", TrainingSpec(adapter="ia3")),
        ("sequence-classification", TrainingSpec(adapter="lora", target_modules=["query", "value"])),
        ("token-classification", TrainingSpec(adapter="prefix_tuning", num_virtual_tokens=20)),
        ("token-classification", TrainingSpec(adapter="prompt_tuning", num_virtual_tokens=112)),
    ],
)
def test_what_trains_passes(task: str, spec: TrainingSpec, tiny_chat_dir: Path, tiny_encoder_dir: Path) -> None:
    check_against_model(spec, task, tiny_chat_dir if task == "chat" else tiny_encoder_dir, name="m", examples=8)


def test_a_check_leaves_no_trace_on_the_process(tiny_chat_dir: Path) -> None:
    import torch

    before = torch.random.get_rng_state()
    with pytest.raises(InvalidRequestError):
        check_against_model(
            TrainingSpec(adapter="lora", target_modules=["nope"]), "chat", tiny_chat_dir, name="m", examples=8
        )
    check_against_model(TrainingSpec(adapter="prompt_tuning"), "chat", tiny_chat_dir, name="m", examples=8)
    assert torch.equal(torch.random.get_rng_state(), before)  # the server's random state is its own
