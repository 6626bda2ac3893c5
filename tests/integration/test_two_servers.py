"""Two `llmos serve` processes on one PostgreSQL database, driven at once (issue 21, point 3):
limits are shared, an idempotency key holds across servers, and what one server records the
other sees."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import ADMIN_KEY, Server, start_server, stop_server
from tests.postgres import postgres_server


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    # One data directory: servers on one database share its key secret and artifact store.
    home: Path = tmp_path_factory.mktemp("two-servers")
    with postgres_server() as url:
        first = start_server(home, database_url=url, limits_store="database", max_concurrent_jobs="0")
        try:
            second = start_server(home, database_url=url, limits_store="database", max_concurrent_jobs="0")
        except BaseException:
            stop_server(first)
            raise
        yield first, second
        assert stop_server(second) == 0
        assert stop_server(first) == 0


def _admin(server: Server, method: str, path: str, **kwargs: object) -> httpx.Response:
    reply = httpx.request(method, f"{server.url}{path}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, **kwargs)  # type: ignore[arg-type]
    reply.raise_for_status()
    return reply


def test_a_tenants_rate_limit_holds_across_both_servers(servers: tuple[Server, Server]) -> None:
    first, second = servers
    _admin(first, "POST", "/v1/admin/tenants", json={"id": "shared", "limits": {"requests_per_minute": 8}})
    secret = _admin(second, "POST", "/v1/admin/keys", json={"name": "app", "tenant": "shared", "scopes": ["files"]})
    clients = [
        openai.OpenAI(base_url=f"{s.url}/v1", api_key=secret.json()["key"], max_retries=0) for s in (first, second)
    ]

    def attempt(i: int) -> str:
        try:
            clients[i % 2].files.list()
        except openai.RateLimitError as exc:
            return str(exc.body["code"])  # type: ignore[index]
        return "ok"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(attempt, range(24)))
    assert outcomes.count("ok") == 8
    assert outcomes.count("rate_limit_exceeded") == 16


def test_an_idempotency_key_holds_across_servers(servers: tuple[Server, Server]) -> None:
    line = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    clients = [s.client() for s in servers]

    def upload(i: int) -> str:
        return (
            clients[i % 2]
            .files.create(
                file=("train.jsonl", line * 4), purpose="fine-tune", extra_headers={"Idempotency-Key": "two-servers-1"}
            )
            .id
        )

    with ThreadPoolExecutor(4) as pool:
        ids = set(pool.map(upload, range(4)))
    assert len(ids) == 1
    (file_id,) = ids
    assert [f.id for f in clients[1].files.list() if f.filename == "train.jsonl"] == [file_id]
    assert clients[0].files.content(file_id).read() == line * 4


def test_what_one_server_audits_the_other_lists(servers: tuple[Server, Server]) -> None:
    first, second = servers
    _admin(first, "POST", "/v1/admin/tenants", json={"id": "audited"})
    actions = [(e["action"], e.get("target")) for e in _admin(second, "GET", "/v1/admin/audit").json()["data"]]
    assert ("tenant.create", "audited") in actions
