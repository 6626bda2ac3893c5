"""/v1/batches through the official openai client (on the fake engine): create, progress to
completed, output and error files, cancel, a restart mid-batch that answers no line twice,
tenant isolation and bad input; the store's takeover of a batch whose server fell silent; and
the scheduler's background share."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from llmos.api import create_app
from llmos.engine.protocol import GenerationDelta, GenerationRequest, SamplingParams
from llmos.engine.scheduler import BACKGROUND, Pending, Scheduler
from llmos.kernel import batches as batch_module
from llmos.kernel.batches import BatchStore
from llmos.platform import Platform
from tests.conftest import ADMIN_KEY
from tests.fake_engine import FakeEngine

CHAT = "/v1/chat/completions"


@dataclasses.dataclass
class GatedEngine(FakeEngine):
    """Answers the first ``allowed`` generations; later ones wait until they are cancelled."""

    allowed: int = 10**9
    answered: list[int] = dataclasses.field(default_factory=list)
    """The prompt's first token (which line it was) of every generation that finished."""

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationDelta, None]:
        self.requests.append(request)
        if len(self.answered) >= self.allowed:
            await asyncio.Event().wait()
        self.answered.append(request.prompt_token_ids[0])
        for delta in self.deltas:
            yield delta


def chat_line(i: int, model: str = "tiny-chat") -> dict[str, Any]:
    # The fake engine's chat prompt is one token, 1 + the content's length: it tells lines apart.
    body = {"model": model, "messages": [{"role": "user", "content": "x" * i}], "max_tokens": 4}
    return {"custom_id": f"line-{i}", "method": "POST", "url": CHAT, "body": body}


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


@contextmanager
def serving(platform: Platform, engine: FakeEngine) -> Iterator[openai.OpenAI]:
    with TestClient(create_app(platform=platform, engine=engine)) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key=ADMIN_KEY, http_client=http, max_retries=0)


def wait_for(client: openai.OpenAI, batch_id: str, done: Callable[[Any], bool], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if done(batch):
            return batch
        assert time.monotonic() < deadline, f"batch stuck: {batch}"
        time.sleep(0.05)


def upload(client: openai.OpenAI, rows: list[dict[str, Any]]) -> str:
    return client.files.create(file=("in.jsonl", jsonl(rows)), purpose="batch").id


def output_lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_batch_runs_to_completed_with_its_output_and_error_files(loaded_platform: Platform) -> None:
    rows = [chat_line(1), chat_line(2, model="no-such-model"), chat_line(3)]
    engine = GatedEngine()
    with serving(loaded_platform, engine) as client:
        created = client.batches.create(
            input_file_id=upload(client, rows), endpoint=CHAT, completion_window="24h", metadata={"run": "a"}
        )
        assert created.status == "validating" and created.metadata == {"run": "a"}
        assert created.request_counts is not None and created.request_counts.total == 3
        batch = wait_for(client, created.id, lambda b: b.status == "completed")
        assert batch.request_counts is not None
        assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 1)
        assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
        outputs = output_lines(client, batch.output_file_id)
        assert [o["custom_id"] for o in outputs] == ["line-1", "line-3"]
        assert outputs[0]["response"]["status_code"] == 200 and outputs[0]["error"] is None
        assert outputs[0]["response"]["body"]["choices"][0]["message"]["content"] == "Hello"
        (failed,) = output_lines(client, batch.error_file_id)
        assert failed["custom_id"] == "line-2" and failed["response"]["status_code"] == 404
        assert failed["response"]["body"]["error"]["param"] == "model"
        assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
        listed = client.batches.list(limit=10)
        assert [b.id for b in listed.data] == [created.id]
    # Its lines went through the engine at background priority.
    assert engine.requests and all(r.background for r in engine.requests)


def test_embeddings_batch(loaded_platform: Platform) -> None:
    rows = [
        {
            "custom_id": f"e{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "tiny-embed", "input": "hi"},
        }
        for i in range(3)
    ]
    with serving(loaded_platform, GatedEngine()) as client:
        created = client.batches.create(
            input_file_id=upload(client, rows), endpoint="/v1/embeddings", completion_window="24h"
        )
        batch = wait_for(client, created.id, lambda b: b.status == "completed")
        outputs = output_lines(client, batch.output_file_id)
        assert [o["custom_id"] for o in outputs] == ["e0", "e1", "e2"]
        assert outputs[0]["response"]["body"]["object"] == "list"


def test_cancel_stops_the_batch_and_reports_unanswered_lines(loaded_platform: Platform) -> None:
    engine = GatedEngine(allowed=1)
    with serving(loaded_platform, engine) as client:
        created = client.batches.create(
            input_file_id=upload(client, [chat_line(i) for i in range(1, 5)]), endpoint=CHAT, completion_window="24h"
        )
        wait_for(client, created.id, lambda b: b.request_counts.completed == 1)
        cancelling = client.batches.cancel(created.id)
        assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
        batch = wait_for(client, created.id, lambda b: b.status == "cancelled")
        assert batch.cancelled_at and batch.request_counts.completed == 1
        assert len(output_lines(client, batch.output_file_id)) == 1
        unanswered = output_lines(client, batch.error_file_id)
        assert len(unanswered) == 3 and {u["error"]["code"] for u in unanswered} == {"batch_cancelled"}
        with pytest.raises(openai.BadRequestError) as refused:
            client.batches.cancel(created.id)
        assert refused.value.body["param"] == "batch_id"  # type: ignore[index]


def test_a_batch_past_its_window_expires_with_what_was_answered(
    loaded_platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch_module, "WINDOWS", {"24h": timedelta(seconds=2)})
    with serving(loaded_platform, GatedEngine(allowed=1)) as client:
        created = client.batches.create(
            input_file_id=upload(client, [chat_line(i) for i in range(1, 4)]), endpoint=CHAT, completion_window="24h"
        )
        batch = wait_for(client, created.id, lambda b: b.status == "expired")
        assert batch.expired_at and batch.request_counts.completed == 1
        (done,) = [o["custom_id"] for o in output_lines(client, batch.output_file_id)]
        unanswered = output_lines(client, batch.error_file_id)
        assert sorted([done] + [u["custom_id"] for u in unanswered]) == ["line-1", "line-2", "line-3"]
        assert {u["error"]["code"] for u in unanswered} == {"batch_expired"} and len(unanswered) == 2


def test_restart_mid_batch_resumes_and_answers_no_line_twice(loaded_platform: Platform) -> None:
    rows = [chat_line(i) for i in range(1, 9)]
    first = GatedEngine(allowed=3)
    with serving(loaded_platform, first) as client:
        created = client.batches.create(input_file_id=upload(client, rows), endpoint=CHAT, completion_window="24h")
        wait_for(client, created.id, lambda b: b.request_counts.completed == 3)
        assert len(first.requests) > 3  # lines were in flight when the server stopped
    second = GatedEngine()
    with serving(loaded_platform, second) as client:
        batch = wait_for(client, created.id, lambda b: b.status == "completed")
        outputs = output_lines(client, batch.output_file_id)
    assert [o["custom_id"] for o in outputs] == [f"line-{i}" for i in range(1, 9)]
    assert batch.request_counts.completed == 8 and batch.error_file_id is None
    answered = Counter(first.answered + second.answered)
    assert sorted(answered) == [1 + i for i in range(1, 9)] and set(answered.values()) == {1}


def test_another_tenants_batch_is_404(loaded_platform: Platform) -> None:
    loaded_platform.tenants.create("other")
    other_key = loaded_platform.keys.create("other", tenant="other", scopes=("inference", "files"))[1]
    with serving(loaded_platform, GatedEngine()) as client:
        created = client.batches.create(
            input_file_id=upload(client, [chat_line(1)]), endpoint=CHAT, completion_window="24h"
        )
        other = client.with_options(api_key=other_key)
        with pytest.raises(openai.NotFoundError):
            other.batches.retrieve(created.id)
        with pytest.raises(openai.NotFoundError):
            other.batches.cancel(created.id)
        assert other.batches.list().data == []


def test_bad_input_is_refused_naming_the_field(loaded_platform: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    with serving(loaded_platform, GatedEngine()) as client:
        chat_file = upload(client, [chat_line(1), chat_line(2)])
        tune = client.files.create(
            file=(
                "t.jsonl",
                jsonl([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]),
            ),
            purpose="fine-tune",
        )

        def refused(**body: Any) -> str | None:
            with pytest.raises(openai.BadRequestError) as exc:
                client.batches.create(**{"endpoint": CHAT, "completion_window": "24h", **body})
            return exc.value.body["param"]  # type: ignore[index,no-any-return]

        assert refused(input_file_id=tune.id) == "input_file_id"  # wrong purpose
        assert refused(input_file_id=chat_file, endpoint="/v1/embeddings") == "endpoint"  # lines for another endpoint
        assert refused(input_file_id=chat_file, endpoint="/v1/responses") == "endpoint"
        assert refused(input_file_id=chat_file, completion_window="1h") == "completion_window"
        monkeypatch.setattr(batch_module, "MAX_LINES", 1)
        assert refused(input_file_id=chat_file) == "input_file_id"  # over the line limit
        monkeypatch.setattr(batch_module, "MAX_LINES", 50_000)
        # A line whose body its endpoint's schema refuses: the file is invalid, named by line and field.
        bad = dict(chat_line(1), body={"model": "tiny-chat", "messages": "hi"})
        stored = client.files.create(file=("bad.jsonl", jsonl([bad])), purpose="batch")
        assert stored.status == "error" and "line 1" in (stored.status_details or "")
        assert "body.messages" in (stored.status_details or "")
        assert refused(input_file_id=stored.id) == "input_file_id"
        streaming = dict(chat_line(1), body={**chat_line(1)["body"], "stream": True})
        assert client.files.create(file=("s.jsonl", jsonl([streaming])), purpose="batch").status == "error"
        assert client.batches.list().data == []  # nothing was created


def test_a_batch_whose_server_fell_silent_is_taken_over(loaded_platform: Platform) -> None:
    now = [datetime(2026, 12, 6, tzinfo=UTC)]
    store = BatchStore(loaded_platform.db, loaded_platform.files, clock=lambda: now[0])
    file = loaded_platform.files.create(
        tenant="default", purpose="batch", filename="b.jsonl", chunks=[jsonl([chat_line(1)])], max_bytes=10**6
    )[0]
    batch = store.create(
        tenant="default", key_id=None, body={"input_file_id": file.id, "endpoint": CHAT, "completion_window": "24h"}
    )
    assert [b.id for b in store.claim("a", timedelta(seconds=30))] == [batch.id]
    assert store.claim("b", timedelta(seconds=30)) == []  # "a" is alive
    now[0] += timedelta(seconds=31)
    (taken,) = store.claim("b", timedelta(seconds=30))
    assert taken.status.value == "in_progress"
    assert store.beat("a", [batch.id]) == {}  # "a" learns it lost it
    assert store.record(batch.id, 1, "line-1", "r1", 200, {}) and not store.record(batch.id, 1, "line-1", "r2", 200, {})


def _pending(i: int, background: bool, tenant: str = "t") -> Pending:
    request = GenerationRequest(f"r{i}", "m", [1], SamplingParams(max_tokens=4), tenant=tenant, background=background)
    return Pending(request, lambda delta: None, reserve=8)


def test_background_rows_take_only_spare_rows_and_are_parked_for_interactive_ones() -> None:
    scheduler = Scheduler(max_rows=8, batch_wait_s=0, light_rows=0)
    for i in range(8):
        scheduler.put(_pending(i, background=True))
    held: Counter[str] = Counter()
    reserved: list[int] = []
    admitted = scheduler.admit(block=False, held=held, reserved=reserved, fits=lambda r: True)
    assert len(admitted) == 6 and held == {BACKGROUND: 6}  # a quarter of the batch kept free
    for i in range(8, 10):
        scheduler.put(_pending(i, background=False))
    admitted = scheduler.admit(block=False, held=held, reserved=reserved, fits=lambda r: True)
    assert [p.request.request_id for p in admitted] == ["r8", "r9"]  # interactive requests found rows
    caps = scheduler.caps(held)
    assert caps[BACKGROUND] == 4
    park, _ = scheduler.shares([BACKGROUND] * 6 + ["t", "t"], [], caps)
    assert park == [4, 5]  # the latest background rows wait while interactive ones run
