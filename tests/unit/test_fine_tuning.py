"""Fine-tuning end to end on the tiny chat model, through the official openai client: upload,
create, events, checkpoints, the result served at once; cancel, pause/resume, a killed worker."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import time
from collections.abc import Callable

import openai
import pytest
from fastapi.testclient import TestClient

from llmos.kernel.supervisor import JobSupervisor
from llmos.platform import Platform
from llmos.registry.tables import JobRow
from tests.conftest import ADMIN_KEY

ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"Say the word number {i}"},
            {"role": "assistant", "content": "Paris is the capital of France."},
        ]
    }
    for i in range(12)
]
LORA = {
    "type": "supervised",
    "supervised": {
        "hyperparameters": {"n_epochs": 2, "batch_size": 4},
        "adapter": {"type": "lora", "r": 4, "alpha": 8},
    },
}


def upload(client: openai.OpenAI, rows: list[dict] = ROWS) -> str:
    data = "\n".join(json.dumps(r) for r in rows).encode()
    return client.files.create(file=("train.jsonl", data), purpose="fine-tune").id


def wait_for(client: openai.OpenAI, job_id: str, states: set[str], timeout: float = 240) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in states:
            return job
        time.sleep(0.3)
    events = [e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=50).data]
    raise AssertionError(f"job {job_id} stuck in {job.status}: {events}")


def drive(
    supervisor: JobSupervisor, client: openai.OpenAI, job_id: str, done: Callable[[], bool], timeout: float = 240
) -> None:
    """Tick the supervisor (no other runs) until ``done()``: each tick starts, stops or settles
    what it can, so the job's status moves only where the test can see why."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            events = [e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=50).data]
            raise AssertionError(f"job {job_id} stuck in {client.fine_tuning.jobs.retrieve(job_id).status}: {events}")
        supervisor.tick()
        time.sleep(0.1)


@pytest.mark.slow
def test_fine_tune_then_chat_with_the_result(client: openai.OpenAI) -> None:
    training = upload(client)
    tags = {"team": "nlp", "ticket": "x" * 512}
    job = client.fine_tuning.jobs.create(
        model="tiny-chat",
        training_file=training,
        validation_file=training,
        suffix="demo",
        seed=7,
        method=LORA,  # type: ignore[arg-type]
        metadata=tags,
    )
    assert job.status == "queued" and job.hyperparameters.n_epochs == 2 and job.metadata == tags
    done = wait_for(client, job.id, {"succeeded", "failed"})
    assert done.status == "succeeded", done.error  # type: ignore[attr-defined]
    name = done.fine_tuned_model  # type: ignore[attr-defined]
    assert name.startswith("ft:tiny-chat:default:demo:")
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and any("train_loss" in (e.data or {}) for e in metrics)  # type: ignore[operator]
    assert any("valid_loss" in (e.data or {}) for e in metrics)  # type: ignore[operator]
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert len(checkpoints) == 2 and checkpoints[0].step_number > checkpoints[1].step_number
    scored = {e.data["step"]: e.data["valid_loss"] for e in metrics if e.data and "valid_loss" in e.data}  # type: ignore[index,operator]
    for checkpoint in checkpoints:  # each epoch's checkpoint carries that epoch's validation loss
        recorded = checkpoint.metrics.model_dump(exclude_none=True)
        assert recorded["step"] == checkpoint.step_number
        assert recorded["valid_loss"] == pytest.approx(scored[checkpoint.step_number]) and recorded["valid_loss"] > 0
    model = client.models.retrieve(name)
    assert model.parent == "tiny-chat"  # type: ignore[attr-defined]
    assert model.format == "lora"  # type: ignore[attr-defined]  # an adapter served beside its base, not a copy
    assert model.extra["job_id"] == job.id  # type: ignore[attr-defined]
    reply = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Say the word number 3"}], temperature=0, max_tokens=12
    )
    assert reply.choices[0].message.content  # served at once, like any model
    first = checkpoints[-1].fine_tuned_model_checkpoint
    assert first == f"{name}:ckpt-step-{checkpoints[-1].step_number}"
    earlier = client.chat.completions.create(model=first, messages=[{"role": "user", "content": "3"}], max_tokens=4)
    assert earlier.model == first  # an intermediate checkpoint is servable too
    assert client.models.retrieve(first).extra["checkpoint_step"] == checkpoints[-1].step_number  # type: ignore[attr-defined]
    assert (done.trained_tokens or 0) > 0  # type: ignore[attr-defined]
    assert done.metadata == tags  # type: ignore[attr-defined]

    # The result file: every metrics report, a row per step, served by the files API.
    (result_file,) = done.result_files  # type: ignore[attr-defined]
    assert client.files.retrieve(result_file).purpose == "fine-tune-results"
    table = {int(r["step"]): r for r in csv.DictReader(io.StringIO(client.files.content(result_file).text))}
    assert sorted(table) == sorted({e.data["step"] for e in metrics})  # type: ignore[index]
    for event in metrics:
        row = table[event.data["step"]]  # type: ignore[index]
        for name, value in event.data.items():  # type: ignore[union-attr]
            if isinstance(value, float):
                assert float(row[name]) == pytest.approx(value), name

    # has_more is what the store found, not a guess from the page size.
    page = client.fine_tuning.jobs.checkpoints.list(job.id, limit=1)
    assert [c.id for c in page.data] == [checkpoints[0].id] and page.has_more
    rest = client.fine_tuning.jobs.checkpoints.list(job.id, limit=1, after=page.data[0].id)
    assert [c.id for c in rest.data] == [checkpoints[1].id] and not rest.has_more
    assert len(events) < 100
    assert not client.fine_tuning.jobs.list_events(job.id, limit=len(events)).has_more
    assert client.fine_tuning.jobs.list_events(job.id, limit=len(events) - 1).has_more


def test_bad_job_requests_are_refused_before_queueing(client: openai.OpenAI) -> None:
    training = upload(client)
    bad_file = client.files.create(file=("bad.jsonl", b'{"messages": []}'), purpose="fine-tune").id
    cases = [
        ({"model": "no-such-model", "training_file": training}, "model"),
        ({"model": "tiny-embed", "training_file": training}, "training_file"),  # chat data on an encoder
        ({"model": "tiny-chat", "training_file": "file-000000000000000000000000"}, "training_file"),
        ({"model": "tiny-chat", "training_file": bad_file}, "training_file"),
        ({"model": "tiny-chat", "training_file": training, "suffix": "Bad Suffix!"}, "suffix"),
        (
            {
                "model": "tiny-chat",
                "training_file": training,
                "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}},
            },
            "method.supervised.hyperparameters.n_epochs",
        ),
        (
            {
                "model": "tiny-chat",
                "training_file": training,
                "method": {"type": "supervised", "supervised": {"adapter": {"type": "dora"}}},
            },
            "method.supervised.adapter.type",
        ),
        (
            {
                "model": "tiny-chat",
                "training_file": training,
                "method": {
                    "type": "supervised",
                    "supervised": {"adapter": {"type": "prompt_tuning", "num_virtual_tokens": 0}},
                },
            },
            "method.supervised.adapter.num_virtual_tokens",
        ),
        ({"model": "tiny-chat", "training_file": training, "tenant": "someone-else"}, "tenant"),
        ({"model": "tiny-chat", "training_file": training, "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"model": "tiny-chat", "training_file": training, "metadata": {"k" * 65: "v"}}, "metadata"),
        ({"model": "tiny-chat", "training_file": training, "metadata": ["team", "nlp"]}, "metadata"),
        ({"model": "tiny-chat", "training_file": training, "metadata": {"team": 7}}, "metadata.team"),
        ({"model": "tiny-chat", "training_file": training, "metadata": {"team": "x" * 513}}, "metadata.team"),
    ]
    for body, param in cases:
        with pytest.raises((openai.BadRequestError, openai.NotFoundError)) as exc:
            client.post("/fine_tuning/jobs", body=body, cast_to=object)
        assert exc.value.body["param"] == param, (body, exc.value.body)  # type: ignore[index]
    assert client.fine_tuning.jobs.list().data == []


@pytest.mark.slow
def test_cancel_stops_a_running_job(
    quiet_client: openai.OpenAI, supervisor: JobSupervisor, loaded_platform: Platform
) -> None:
    client = quiet_client
    training = upload(client, ROWS * 20)
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 1}}}
    job = client.fine_tuning.jobs.create(model="tiny-chat", training_file=training, method=method)  # type: ignore[arg-type]
    assert job.status == "queued"
    supervisor.tick()  # claims it and starts its worker
    assert supervisor.running == [job.id] and client.fine_tuning.jobs.retrieve(job.id).status == "running"

    def training_steps() -> bool:
        return any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id, limit=20).data)

    drive(supervisor, client, job.id, training_steps)
    assert client.fine_tuning.jobs.cancel(job.id).status == "running"  # asked; the supervisor carries it out
    drive(supervisor, client, job.id, lambda: not supervisor.running, timeout=30)
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "cancelled" and done.finished_at is not None
    with loaded_platform.db.session() as s:
        row = s.get(JobRow, job.id)
        assert row is not None and row.worker_pid is None and row.control is None


@pytest.mark.slow
def test_killed_worker_resumes_from_its_checkpoint(client: openai.OpenAI, loaded_platform: Platform) -> None:
    training = upload(client, ROWS * 4)
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 8, "batch_size": 2}}}
    job = client.fine_tuning.jobs.create(model="tiny-chat", training_file=training, method=method)  # type: ignore[arg-type]
    deadline = time.monotonic() + 120
    while not client.fine_tuning.jobs.checkpoints.list(job.id).data:
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.2)
    with loaded_platform.db.session() as s:
        pid = s.get(JobRow, job.id).worker_pid  # type: ignore[union-attr]
    assert pid
    os.kill(pid, signal.SIGKILL)
    done = wait_for(client, job.id, {"succeeded", "failed"})
    assert done.status == "succeeded", done.error  # type: ignore[attr-defined]
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=200).data]
    assert any("exited unexpectedly" in m for m in messages)
    assert any(m.startswith("Resumed from checkpoint") for m in messages)
    with loaded_platform.db.session() as s:
        assert s.get(JobRow, job.id).attempts == 2  # type: ignore[union-attr]


@pytest.mark.slow
def test_pause_and_resume(quiet_client: openai.OpenAI, supervisor: JobSupervisor) -> None:
    client = quiet_client
    training = upload(client, ROWS * 10)
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 8, "batch_size": 2}}}
    job = client.fine_tuning.jobs.create(model="tiny-chat", training_file=training, method=method)  # type: ignore[arg-type]
    supervisor.tick()
    assert client.fine_tuning.jobs.pause(job.id).status == "running"  # asked; the supervisor carries it out
    drive(supervisor, client, job.id, lambda: not supervisor.running, timeout=30)
    paused = client.fine_tuning.jobs.retrieve(job.id)
    assert paused.status == "paused" and paused.finished_at is None
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    supervisor.tick()
    assert supervisor.running == [job.id]
    drive(supervisor, client, job.id, lambda: not supervisor.running)
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded", done.error
    assert done.trained_tokens and len(done.result_files) == 1


@pytest.mark.slow
def test_classifier_fine_tune_then_classify(client: openai.OpenAI, http: TestClient) -> None:
    rows = [
        {"text": "hello how are you today", "label": "greeting"},
        {"text": "the capital of france is paris", "label": "fact"},
    ] * 12
    data = "\n".join(json.dumps(r) for r in rows).encode()
    training = client.files.create(file=("cls.jsonl", data), purpose="fine-tune").id
    with pytest.raises(openai.BadRequestError) as wrong:  # chat data on an encoder
        client.fine_tuning.jobs.create(model="tiny-embed", training_file=upload(client))
    assert wrong.value.body["param"] == "training_file"  # type: ignore[index]
    method = {
        "type": "supervised",
        "supervised": {
            "hyperparameters": {"n_epochs": 6, "batch_size": 4, "learning_rate_multiplier": 100},
            "adapter": {"type": "full"},
            "lr_scheduler": "constant",
        },
    }
    job = client.fine_tuning.jobs.create(
        model="tiny-embed", training_file=training, validation_file=training, method=method
    )  # type: ignore[arg-type]
    done = wait_for(client, job.id, {"succeeded", "failed"})
    assert done.status == "succeeded", done.error  # type: ignore[attr-defined]
    name = done.fine_tuned_model  # type: ignore[attr-defined]
    assert client.models.retrieve(name).task == "sequence-classification"  # type: ignore[attr-defined]
    checkpoint = client.fine_tuning.jobs.checkpoints.list(job.id).data[0].model_dump()
    assert {"valid_accuracy", "valid_macro_f1", "valid_report"} <= set(checkpoint["metrics"])
    resp = http.post(
        "/v1/classifications",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        json={"model": name, "input": ["hello how are you today", "the capital of france is paris"]},
    )
    assert resp.status_code == 200, resp.text
    out = resp.json()["data"]
    events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert [d["label"] for d in out] == ["greeting", "fact"], (out, events)
    assert abs(sum(s["score"] for s in out[0]["scores"]) - 1) < 1e-4
    first = client.fine_tuning.jobs.checkpoints.list(job.id).data[-1].fine_tuned_model_checkpoint
    assert first and first.startswith(f"{name}:ckpt-step-")
    early = http.post(
        "/v1/classifications", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, json={"model": first, "input": "hi"}
    )
    assert early.status_code == 200, early.text  # an encoder job's checkpoints are servable too
    assert client.models.retrieve(first).task == "sequence-classification"  # type: ignore[attr-defined]
    chat_model = http.post(
        "/v1/classifications",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        json={"model": "tiny-chat", "input": "x"},
    )
    assert chat_model.status_code == 400


@pytest.mark.slow
def test_cross_encoder_fine_tune_then_rerank(client: openai.OpenAI, http: TestClient) -> None:
    """Pairs of texts (query, passage) train a cross-encoder, which /v1/rerank then serves: its
    relevance is the probability of label 1, read from both texts together."""
    queries = {"where is paris": "paris is the capital of france", "how are you": "i am fine thank you"}
    rows = [{"text": q, "text_pair": p, "label": int(queries[q] == p)} for q in queries for p in queries.values()] * 8
    data = "\n".join(json.dumps(r) for r in rows).encode()
    training = client.files.create(file=("pairs.jsonl", data), purpose="fine-tune").id
    method = {
        "type": "supervised",
        "supervised": {
            "hyperparameters": {"n_epochs": 15, "batch_size": 4, "learning_rate_multiplier": 100},
            "adapter": {"type": "full"},
            "lr_scheduler": "constant",
        },
    }
    job = client.fine_tuning.jobs.create(model="tiny-embed", training_file=training, method=method)  # type: ignore[arg-type]
    done = wait_for(client, job.id, {"succeeded", "failed"})
    assert done.status == "succeeded", done.error  # type: ignore[attr-defined]
    name = done.fine_tuned_model  # type: ignore[attr-defined]
    for query, passage in queries.items():
        resp = http.post(
            "/v1/rerank",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            json={"model": name, "query": query, "documents": list(queries.values())},
        )
        assert resp.status_code == 200, resp.text
        best = resp.json()["results"][0]
        assert list(queries.values())[best["index"]] == passage, resp.json()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "fmt"), [("adalora", "safetensors"), ("prefix_tuning", "prefix"), ("prompt_tuning", "prefix")]
)
def test_every_peft_method_trains_a_servable_chat_model(client: openai.OpenAI, method: str, fmt: str) -> None:
    training = upload(client)
    adapter = {"type": method, "r": 4, "alpha": 8, "num_virtual_tokens": 4}
    job = client.fine_tuning.jobs.create(
        model="tiny-chat",
        training_file=training,
        validation_file=training,
        seed=3,
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 5},
                "adapter": adapter,
            },
        },
    )  # type: ignore[arg-type]
    done = wait_for(client, job.id, {"succeeded", "failed"})
    assert done.status == "succeeded", done.error  # type: ignore[attr-defined]
    name = done.fine_tuned_model  # type: ignore[attr-defined]
    model = client.models.retrieve(name)
    assert model.format == fmt and model.extra["hyperparameters"]["adapter"] == method  # type: ignore[attr-defined]
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    by_step = {e.data["step"]: e.data["valid_loss"] for e in events if e.data and "valid_loss" in e.data}  # type: ignore[index,operator]
    losses = [by_step[step] for step in sorted(by_step)]
    assert len(losses) == 2 and losses[1] < losses[0]  # validation loss after each epoch: it went down
    reply = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Say the word number 3"}], temperature=0, max_tokens=8
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    if fmt == "prefix":  # adapters are servable at every epoch; merged methods only at the end
        first = checkpoints[-1].fine_tuned_model_checkpoint
        assert client.chat.completions.create(model=first, messages=[{"role": "user", "content": "3"}], max_tokens=4)
