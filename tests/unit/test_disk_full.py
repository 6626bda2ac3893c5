"""A full disk (ENOSPC, injected into the writes) during an upload or a checkpoint: a clear
error, nothing half-written left behind, the last good state kept, the server still up."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

import llmos.registry.store as store_module
import llmos.training.checkpoints as checkpoints
from llmos.api import create_app
from llmos.errors import InsufficientStorageError
from llmos.platform import Platform
from llmos.registry.tables import FileRow
from tests.conftest import ADMIN_KEY

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def disk_full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FillingFile:
    """A real file whose disk fills up: the first write lands partly, the next ones fail."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self._writes = 0

    def write(self, data: bytes) -> int:
        self._writes += 1
        if self._writes > 1:
            raise disk_full()
        return int(self._real.write(data[: len(data) // 2]))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __enter__(self) -> _FillingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._real.close()


class _FullDiskOs:
    """``os`` as the artifact store sees it, with files opened on a disk that fills up."""

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    @staticmethod
    def fdopen(fd: int, mode: str) -> _FillingFile:
        return _FillingFile(os.fdopen(fd, mode))


@pytest.fixture
def http(platform: Platform) -> Iterator[TestClient]:
    with TestClient(create_app(platform=platform)) as client:
        yield client


def _store_files(platform: Platform) -> list[Path]:
    return [p for p in platform.registry.store.root.rglob("*") if p.is_file()]


def test_upload_on_a_full_disk_is_a_507_and_leaves_nothing(
    http: TestClient, platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _store_files(platform)
    data = ("\n".join(json.dumps(CHAT) for _ in range(20000))).encode()  # several write chunks
    monkeypatch.setattr(store_module, "os", _FullDiskOs())
    resp = http.post("/v1/files", headers=AUTH, files={"file": ("t.jsonl", data)}, data={"purpose": "fine-tune"})
    assert resp.status_code == 507
    error = resp.json()["error"]
    assert error["code"] == "disk_full" and error["type"] == "server_error"
    assert "no space left on device" in error["message"]
    assert _store_files(platform) == before  # no partial blob, no temporary file
    with platform.db.session() as s:
        assert s.query(FileRow).count() == 0

    monkeypatch.undo()  # space freed: the server is still up and the same upload works
    assert http.get("/health").status_code == 200
    again = http.post("/v1/files", headers=AUTH, files={"file": ("t.jsonl", data)}, data={"purpose": "fine-tune"})
    assert again.status_code == 200 and again.json()["status"] == "processed"


def test_a_full_disk_anywhere_in_a_request_is_a_507_not_a_crash(
    http: TestClient, platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise disk_full()

    monkeypatch.setattr(platform.files, "create", full)  # e.g. spooling the multipart body failed
    resp = http.post("/v1/files", headers=AUTH, files={"file": ("t.jsonl", b"{}")}, data={"purpose": "fine-tune"})
    assert resp.status_code == 507 and resp.json()["error"]["code"] == "disk_full"
    assert http.get("/health").status_code == 200


def _trainer() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def test_checkpoint_on_a_full_disk_keeps_the_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer, scheduler = _trainer()
    checkpoints.save_epoch(
        tmp_path, 0, model=model, optimizer=optimizer, scheduler=scheduler, state={"step": 3, "epoch": 0}
    )
    good = {p.name: p.read_bytes() for p in (tmp_path / "ckpt-epoch-0").iterdir()}

    real_write = Path.write_bytes
    writes = 0

    def filling_write(self: Path, data: bytes) -> int:
        nonlocal writes
        writes += 1
        if writes == 2:  # the optimizer state: half of it lands, then the disk is full
            real_write(self, data[: len(data) // 2])
            raise disk_full()
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", filling_write)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(InsufficientStorageError) as raised:
        checkpoints.save_epoch(
            tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler, state={"step": 6, "epoch": 1}
        )
    monkeypatch.undo()
    assert raised.value.code == "disk_full" and raised.value.status_code == 507
    assert "no space left on device while writing checkpoint ckpt-epoch-1" in raised.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-epoch-0"]  # no ckpt-epoch-1, no .tmp
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt-epoch-0").iterdir()} == good

    fresh, fresh_opt, fresh_sched = _trainer()
    state = checkpoints.resume_latest(
        checkpoints.LocalCheckpoints(tmp_path), fresh, fresh_opt, fresh_sched, lambda message: None
    )
    assert state == {"step": 3, "epoch": 0}
    weights = {k: v for k, v in fresh.state_dict().items()}
    assert not torch.equal(weights["weight"], model.weight.detach())  # the epoch-0 weights, not the lost ones
