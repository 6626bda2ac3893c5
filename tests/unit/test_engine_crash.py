"""A crashed engine loop: its in-flight requests fail at once with a clear error, the engine is
restarted, /ready says so meanwhile, the restart is audited, and the next request succeeds.

The fault is injected into the real engine loop (tiny random Llama): the step that takes new
requests between decode steps raises, which nothing inside the loop catches."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

import llmos.engine.torch_backend.backend as torch_backend_module
from llmos.engine import FinishReason, GenerationDelta, GenerationRequest, SamplingParams
from llmos.engine.local import LocalEngine
from llmos.engine.scheduler import Scheduler
from llmos.engine.torch_backend import CausalRunner
from llmos.errors import ServiceUnavailableError
from llmos.platform import Platform
from tests.conftest import ADMIN_KEY

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
BODY = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "seed": 3}


class LoopFault:
    """Once armed, the engine loop raises the next time it looks for new work while decoding."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.armed = threading.Event()
        self.fired = 0
        original = Scheduler.admit

        def admit(scheduler: Scheduler, *, block: bool, **rest: Any) -> Any:
            if not block and self.armed.is_set():  # not blocking: rows are running
                self.armed.clear()
                self.fired += 1
                raise RuntimeError("injected fault in the engine loop")
            return original(scheduler, block=block, **rest)

        monkeypatch.setattr(Scheduler, "admit", admit)


@pytest.fixture
def fault(monkeypatch: pytest.MonkeyPatch) -> LoopFault:
    return LoopFault(monkeypatch)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_crash_fails_every_inflight_request_and_the_engine_restarts(
    loaded_platform: Platform, fault: LoopFault, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    loads = 0
    original_load = torch_backend_module.load_runner

    def gated_load(*args: Any, **kwargs: Any) -> Any:
        nonlocal loads
        loads += 1
        if loads > 1:  # the restart waits until the test has looked at /ready meanwhile
            gate.wait(60)
        return original_load(*args, **kwargs)

    monkeypatch.setattr(torch_backend_module, "load_runner", gated_load)
    restarts: list[tuple[str, str, bool]] = []
    engine = LocalEngine(loaded_platform.registry, loaded_platform.settings, on_restart=lambda *a: restarts.append(a))
    model_id = loaded_platform.registry.get("tiny-chat").id

    async def main() -> None:
        prompt = await engine.encode_text(await engine.resolve("tiny-chat"), "Hello")
        streams = [
            engine.generate(GenerationRequest(f"r{i}", "tiny-chat", prompt, SamplingParams(max_tokens=200, seed=i)))
            for i in range(3)
        ]
        firsts = [await s.__anext__() for s in streams]  # all three are decoding
        assert all(d.finish_reason is None for d in firsts)
        crashed = engine.residency.peek(model_id)
        fault.armed.set()
        lasts: list[GenerationDelta] = []

        async def drain() -> None:
            for s in streams:
                async for delta in s:
                    if delta.finish_reason is not None:
                        lasts.append(delta)

        await asyncio.wait_for(drain(), 60)  # a dead loop that nobody watches would hang them forever
        assert fault.fired == 1
        assert [d.finish_reason for d in lasts] == [FinishReason.ERROR] * 3
        assert all("engine crashed" in (d.error or "") and "injected fault" in (d.error or "") for d in lasts)

        with pytest.raises(ServiceUnavailableError, match="restarting after a crash"):
            await engine.check_health()  # /ready answers 503 while the fresh runner loads
        gate.set()
        await asyncio.to_thread(wait_for, lambda: engine.restarts == 1, "the restart")
        await engine.check_health()
        fresh = engine.residency.peek(model_id)
        assert isinstance(fresh, CausalRunner) and fresh is not crashed and fresh.crashed is None

        out = [d async for d in engine.generate(GenerationRequest("after", "tiny-chat", prompt, SamplingParams(4)))]
        assert out[-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
        assert engine.stats()["engine_restarts"] == 1
        assert engine.stats()["pending_requests"] == 0
        assert restarts == [("tiny-chat", "RuntimeError: injected fault in the engine loop", True)]
        await engine.shutdown()

    asyncio.run(main())


def _ready_after_restart(http: TestClient, loaded_platform: Platform) -> None:
    wait_for(lambda: bool(loaded_platform.audit.query(action="engine.restart")), "the restart to be audited")
    assert http.get("/ready").status_code == 200


def test_crash_gives_a_non_streaming_request_a_500_and_the_next_one_succeeds(
    http: TestClient, loaded_platform: Platform, fault: LoopFault
) -> None:
    assert http.post("/v1/chat/completions", headers=AUTH, json=BODY).status_code == 200  # model resident
    fault.armed.set()
    resp = http.post("/v1/chat/completions", headers=AUTH, json=BODY)
    assert resp.status_code == 500
    error = resp.json()["error"]
    assert error["code"] == "engine_error" and error["type"] == "server_error"
    assert "engine crashed" in error["message"] and "retry" in error["message"]

    _ready_after_restart(http, loaded_platform)
    event = loaded_platform.audit.query(action="engine.restart")[0]
    assert event.outcome == "success" and event.target == "tiny-chat"
    assert "injected fault" in event.detail["reason"]
    again = http.post("/v1/chat/completions", headers=AUTH, json=BODY)
    assert again.status_code == 200 and again.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_crash_ends_a_stream_with_an_error_event(http: TestClient, loaded_platform: Platform, fault: LoopFault) -> None:
    fault.armed.set()
    with http.stream("POST", "/v1/chat/completions", headers=AUTH, json={**BODY, "stream": True}) as resp:
        assert resp.status_code == 200
        lines = [line for line in resp.iter_lines() if line]
    assert '"error"' in lines[-1] and "engine crashed" in lines[-1]
    assert not any("[DONE]" in line for line in lines)

    _ready_after_restart(http, loaded_platform)
    with http.stream("POST", "/v1/chat/completions", headers=AUTH, json={**BODY, "stream": True}) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
