"""Hyperparameter search: a search's trials are ordinary fine-tuning jobs, created by its runner
and driven tick by tick. In the fast tests the test itself plays each trial's worker (claims the
job, writes validation reports, registers a model), so what the pruner sees is exact; one slow
test runs real workers on the tiny encoder. Bad requests are 400s naming the field, with nothing
created."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from llmos.cli.search import follow_search
from llmos.errors import InvalidRequestError
from llmos.kernel.job_status import JobStatus
from llmos.kernel.jobs import fine_tuned_name
from llmos.kernel.supervisor import JobSupervisor
from llmos.platform import Platform
from llmos.registry.records import Lineage
from llmos.registry.tables import JobRow, SearchRow
from llmos.training.search import study as studies
from llmos.training.search.runner import SearchRunner
from llmos.training.search.service import SearchService
from llmos.training.spec import TrainingSpec, parse_spec
from tests.conftest import ADMIN_KEY
from tests.unit.test_training_loop import SPEC, ToyTask, _fit

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
ROWS = [
    {"text": "hello how are you today", "label": "greeting"},
    {"text": "the capital of france is paris", "label": "fact"},
] * 6


def upload(http: TestClient, rows: list[dict[str, str]] = ROWS) -> str:
    data = "\n".join(json.dumps(r) for r in rows).encode()
    resp = http.post("/v1/files", headers=AUTH, files={"file": ("cls.jsonl", data)}, data={"purpose": "fine-tune"})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["id"])


def body(http: TestClient, **extra: Any) -> dict[str, Any]:
    training = upload(http)
    return {
        "model": "tiny-embed",
        "training_file": training,
        "validation_file": training,
        "seed": 3,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 4}}},
        "search_space": {
            "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True},
            "adapter": {"type": "categorical", "choices": ["lora", "full"]},
            "lora_r": {"type": "categorical", "choices": [4, 8]},
        },
        "sampler": {"type": "random"},
        "pruner": {"type": "median", "n_startup_trials": 1},
        "budget": {"max_trials": 3},
        **extra,
    }


@pytest.fixture
def searches(quiet_http: TestClient) -> SearchService:
    service: SearchService = quiet_http.app.state.searches  # type: ignore[attr-defined]
    return service


@pytest.fixture
def runner(searches: SearchService, loaded_platform: Platform) -> Iterator[SearchRunner]:
    r = SearchRunner(searches, loaded_platform.jobs, loaded_platform.registry, owner="runner-a")
    yield r
    r.stop()


class Worker:
    """Plays a trial's worker: claims its job, reports validation accuracy per epoch, and at the
    end registers a model (the tiny encoder) with the job's final metrics, as a real worker does."""

    def __init__(self, platform: Platform, model_dir: Path) -> None:
        self.platform, self.model_dir = platform, model_dir

    def job_of(self, searches: SearchService, search_id: str, number: int) -> str:
        trial = studies.trials(searches.storage, search_id)[number]
        return str(trial.user_attrs[studies.JOB_ATTR])

    def report(self, job_id: str, *values: float) -> None:
        job = self.platform.jobs.get(None, job_id)
        if job.status is JobStatus.QUEUED:
            self.platform.jobs.claim(job_id)
        done = {e for e, _ in self.platform.jobs.validation_values(job_id, "valid_accuracy")}
        for epoch, value in enumerate(values, start=1):
            if epoch not in done:
                self.platform.jobs.record_metrics(job_id, {"step": epoch, "epoch": epoch, "valid_accuracy": value})

    def succeed(self, job_id: str, final: float) -> str:
        self.report(job_id)  # claimed, if it was still queued
        job = self.platform.jobs.get(None, job_id)
        name = fine_tuned_name(job, "tiny-embed")
        lineage = Lineage(owner=job.tenant, extra={"job_id": job_id, "metrics": {"valid_accuracy": final}})
        self.platform.registry.pull(f"file:{self.model_dir}", name=name, lineage=lineage)
        self.platform.jobs.succeed(job_id, job.attempts, fine_tuned_model=name, trained_tokens=10)
        return name


@pytest.fixture
def worker(loaded_platform: Platform, tiny_encoder_dir: Path) -> Worker:
    return Worker(loaded_platform, tiny_encoder_dir)


def trials(http: TestClient, search_id: str) -> list[dict[str, Any]]:
    resp = http.get(f"/v1/fine_tuning/searches/{search_id}/trials", headers=AUTH)
    assert resp.status_code == 200, resp.text
    return list(resp.json()["data"])


def test_a_search_prunes_a_poor_trial_and_registers_the_best(
    quiet_http: TestClient,
    searches: SearchService,
    runner: SearchRunner,
    worker: Worker,
    loaded_platform: Platform,
    capsys: pytest.CaptureFixture[str],
) -> None:
    resp = quiet_http.post("/v1/fine_tuning/searches", headers=AUTH, json=body(quiet_http))
    assert resp.status_code == 200, resp.text
    search = resp.json()
    assert search["status"] == "queued" and search["objective"] == {"metric": "valid_accuracy", "direction": "maximize"}
    runner.tick()  # trial 0's job created: an ordinary queued fine-tuning job
    job0 = worker.job_of(searches, search["id"], 0)
    job = loaded_platform.jobs.get(None, job0)
    assert job.status is JobStatus.QUEUED and job.metadata == {"search_id": search["id"], "search_trial": "0"}
    params = trials(quiet_http, search["id"])[0]["params"]
    resolved = job.method["resolved"]
    assert resolved["adapter"] == params["adapter"]
    assert resolved["learning_rate_multiplier"] * (2e-4 if params["adapter"] == "lora" else 2e-5) == pytest.approx(
        params["learning_rate"]
    )
    worker.report(job0, 0.5, 0.6)
    model0 = worker.succeed(job0, 0.6)
    runner.tick()  # trial 0 completes; trial 1 starts
    job1 = worker.job_of(searches, search["id"], 1)
    worker.report(job1, 0.2)  # below trial 0's 0.5 at epoch 1: the median pruner stops it
    runner.tick()
    assert loaded_platform.jobs.get(None, job1).control == "cancel"  # its supervisor stops the worker
    shown = trials(quiet_http, search["id"])
    assert [t["state"] for t in shown] == ["complete", "pruned", "running"]
    assert shown[0]["value"] == 0.6 and shown[0]["fine_tuned_model"] == model0
    assert shown[1]["intermediate_values"] == {"1": 0.2} and shown[1]["note"].startswith("pruned after epoch 1")
    job2 = shown[2]["fine_tuning_job_id"]
    worker.report(job2, 0.7, 0.8, 0.9)
    model2 = worker.succeed(job2, 0.9)
    runner.tick()  # the budget of 3 trials is spent: the search finishes
    done = quiet_http.get(f"/v1/fine_tuning/searches/{search['id']}", headers=AUTH).json()
    assert done["status"] == "succeeded", done
    assert done["trials"] == {"total": 3, "running": 0, "complete": 2, "pruned": 1, "failed": 0}
    assert done["best_trial"]["number"] == 2 and done["best_trial"]["value"] == 0.9
    assert done["fine_tuned_model"] == model2 and loaded_platform.registry.get(model2).name == model2
    names = {}
    for file_id in done["result_files"]:
        meta = quiet_http.get(f"/v1/files/{file_id}", headers=AUTH).json()
        names[meta["filename"].removeprefix(search["id"] + "-")] = file_id
    assert set(names) == {
        "trials.csv",
        "optimization_history.png",
        "param_importances.png",
        "parallel_coordinate.png",
    }
    for name, file_id in names.items():
        content = quiet_http.get(f"/v1/files/{file_id}/content", headers=AUTH).content
        if name.endswith(".png"):
            assert content.startswith(b"\x89PNG\r\n\x1a\n"), name
        else:
            table = list(csv.DictReader(io.StringIO(content.decode())))
            assert [r["state"] for r in table] == ["complete", "pruned", "complete"]
            assert table[2]["fine_tuned_model"] == model2
    # `llmos search trials --follow`: each trial's job through the fine-tuning jobs' own view, then the best.
    loaded_platform.jobs.settle_stopped(job1, "stopped")  # its supervisor carries the pruning's cancel out
    client = openai.OpenAI(base_url="http://testserver/v1", api_key=ADMIN_KEY, http_client=quiet_http, max_retries=0)
    capsys.readouterr()
    follow_search(client, search["id"])
    shown_out = capsys.readouterr().out
    assert "trial 1" in shown_out and "cancelled" in shown_out and "pruned" in shown_out
    assert "best: trial 2 valid_accuracy=0.9" in shown_out and model2 in shown_out


def test_a_search_resumes_after_its_server_restarts(
    quiet_http: TestClient, searches: SearchService, worker: Worker, loaded_platform: Platform
) -> None:
    request = body(quiet_http, budget={"max_trials": 3}, pruner={"type": "none"})
    search = quiet_http.post("/v1/fine_tuning/searches", headers=AUTH, json=request).json()
    first = SearchRunner(searches, loaded_platform.jobs, loaded_platform.registry, owner="before")
    first.tick()
    job0 = worker.job_of(searches, search["id"], 0)
    worker.report(job0, 0.4)
    first.tick()
    # The server dies (no release): its hold goes stale. A fresh service and runner, as after a restart.
    restarted = SearchService(
        loaded_platform.db,
        loaded_platform.settings.db_url,
        loaded_platform.registry,
        loaded_platform.files,
        loaded_platform.jobs,
    )
    # It had asked for trial 1 and died before creating its job.
    request_record = searches.store.get(None, search["id"]).request
    studies.load(restarted.storage, search["id"], request_record).ask(request_record.search_space.distributions)
    second = SearchRunner(
        restarted, loaded_platform.jobs, loaded_platform.registry, owner="after", stale_after=timedelta(0)
    )
    try:
        second.tick()  # takes the search over; trial 1 gets its job now
        job1 = worker.job_of(restarted, search["id"], 1)
        worker.report(job0, 0.4, 0.5)
        worker.succeed(job0, 0.5)
        worker.report(job1, 0.3)
        worker.succeed(job1, 0.3)
        second.tick()  # trials 0 and 1 complete, trial 2 starts
        job2 = worker.job_of(restarted, search["id"], 2)
        worker.succeed(job2, 0.7)
        second.tick()
    finally:
        second.stop()
        restarted.close()
    done = quiet_http.get(f"/v1/fine_tuning/searches/{search['id']}", headers=AUTH).json()
    assert done["status"] == "succeeded" and done["best_trial"]["number"] == 2
    shown = trials(quiet_http, search["id"])
    assert shown[0]["intermediate_values"] == {"1": 0.4, "2": 0.5}  # epoch 1 reported once, before the restart
    with loaded_platform.db.session() as s:
        jobs = [r for r in s.query(JobRow).all() if (r.job_metadata or {}).get("search_id") == search["id"]]
    assert sorted(r.id for r in jobs) == sorted({job0, job1, job2})  # one job per trial, none twice


def test_cancel_and_the_wall_time_budget_stop_a_search(
    quiet_http: TestClient, searches: SearchService, runner: SearchRunner, worker: Worker, loaded_platform: Platform
) -> None:
    search = quiet_http.post("/v1/fine_tuning/searches", headers=AUTH, json=body(quiet_http)).json()
    runner.tick()
    job0 = worker.job_of(searches, search["id"], 0)
    worker.report(job0)  # running, no report yet
    cancelled = quiet_http.post(f"/v1/fine_tuning/searches/{search['id']}/cancel", headers=AUTH).json()
    assert cancelled["status"] == "cancelling"
    runner.tick()
    assert loaded_platform.jobs.get(None, job0).control == "cancel"
    runner.tick()
    done = quiet_http.get(f"/v1/fine_tuning/searches/{search['id']}", headers=AUTH).json()
    assert done["status"] == "cancelled" and done["trials"]["failed"] == 1 and done["best_trial"] is None
    again = quiet_http.post(f"/v1/fine_tuning/searches/{search['id']}/cancel", headers=AUTH)
    assert again.status_code == 400 and again.json()["error"]["code"] == "invalid_search_state"

    timed = quiet_http.post(
        "/v1/fine_tuning/searches", headers=AUTH, json=body(quiet_http, budget={"max_wall_seconds": 60})
    ).json()
    later = SearchRunner(
        searches,
        loaded_platform.jobs,
        loaded_platform.registry,
        owner="later",
        clock=lambda: searches.store.clock() + timedelta(seconds=61),
    )
    later.tick()  # its time was spent before any trial started
    done = quiet_http.get(f"/v1/fine_tuning/searches/{timed['id']}", headers=AUTH).json()
    assert done["status"] == "failed" and done["error"]["code"] == "no_trial_completed"
    assert done["trials"]["total"] == 0


BAD = [
    ({"search_space": {"temperature": {"type": "float", "low": 0, "high": 1}}}, "search_space.temperature"),
    ({"search_space": {}}, "search_space"),
    ({"search_space": {"n_epochs": {"type": "int", "low": 5, "high": 2}}}, "search_space.n_epochs.low"),
    (
        {"search_space": {"learning_rate": {"type": "float", "low": 0, "high": 1, "log": True}}},
        "search_space.learning_rate.low",
    ),
    ({"search_space": {"n_epochs": {"type": "float", "low": 1, "high": 3}}}, "search_space.n_epochs.type"),
    ({"search_space": {"adapter": {"type": "int", "low": 1, "high": 3}}}, "search_space.adapter.type"),
    ({"search_space": {"adapter": {"type": ["categorical"]}}}, "search_space.adapter.type"),
    ({"method": "supervised"}, "method.type"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": 5}}}, "method.supervised.hyperparameters"),
    ({"search_space": {"adapter": {"type": "categorical", "choices": []}}}, "search_space.adapter.choices"),
    ({"search_space": {"lora_r": {"type": "categorical", "choices": ["a"]}}}, "search_space.lora_r.choices"),
    ({"search_space": {"n_epochs": {"type": "int", "low": 1, "high": 3, "steps": 2}}}, "search_space.n_epochs.steps"),
    # No valid point: every epoch count above the jobs' 50, every learning rate below a LoRA job's lowest.
    ({"search_space": {"n_epochs": {"type": "int", "low": 60, "high": 80}}}, "search_space.n_epochs"),
    ({"search_space": {"learning_rate": {"type": "float", "low": 1e-9, "high": 1e-8}}}, "search_space.learning_rate"),
    ({"search_space": {"adapter": {"type": "categorical", "choices": ["lora", "bogus"]}}}, "search_space.adapter"),
    ({"budget": {"max_trials": 0}}, "budget.max_trials"),
    ({"budget": {"max_wall_seconds": 0}}, "budget.max_wall_seconds"),
    ({"budget": {"trials": 3}}, "budget.trials"),
    ({"parallelism": 0}, "parallelism"),
    ({"sampler": {"type": "cmaes"}}, "sampler.type"),
    ({"sampler": {"type": "grid"}}, "search_space.learning_rate"),  # a float range has no grid
    ({"pruner": {"type": "median", "n_startup_trials": -1}}, "pruner.n_startup_trials"),
    ({"pruner": {"type": "none", "n_warmup_steps": 1}}, "pruner.n_warmup_steps"),
    ({"validation_file": None}, "validation_file"),
    ({"objective": "valid_loss"}, "objective"),
    ({"model": "no-such-model"}, "model"),
]


def test_bad_searches_are_refused_with_nothing_created(quiet_http: TestClient, loaded_platform: Platform) -> None:
    good = body(quiet_http)
    for change, param in BAD:
        resp = quiet_http.post("/v1/fine_tuning/searches", headers=AUTH, json={**good, **change})
        assert resp.status_code in (400, 404), (change, resp.text)
        error = resp.json()["error"]
        assert error["param"] == param, (change, error)
        assert set(error) == {"message", "type", "param", "code"}
    with loaded_platform.db.session() as s:
        assert s.query(SearchRow).count() == 0 and s.query(JobRow).count() == 0
    assert quiet_http.get("/v1/fine_tuning/searches", headers=AUTH).json()["data"] == []


def test_grid_budget_beyond_the_grid_is_refused(quiet_http: TestClient) -> None:
    space = {"lora_r": {"type": "categorical", "choices": [4, 8]}, "n_epochs": {"type": "int", "low": 1, "high": 2}}
    request = body(quiet_http, search_space=space, sampler={"type": "grid"}, budget={"max_trials": 5})
    resp = quiet_http.post("/v1/fine_tuning/searches", headers=AUTH, json=request)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "budget.max_trials"
    request["budget"] = {}
    created = quiet_http.post("/v1/fine_tuning/searches", headers=AUTH, json=request).json()
    assert created["budget"]["max_trials"] == 4  # the grid's size


def test_without_the_search_extra_the_routes_answer_501(quiet_http: TestClient) -> None:
    quiet_http.app.state.searches = None  # type: ignore[attr-defined]
    resp = quiet_http.get("/v1/fine_tuning/searches", headers=AUTH)
    assert resp.status_code == 501 and "llmos[search]" in resp.json()["error"]["message"]


def test_weight_decay_is_a_job_setting_the_loop_honours(tmp_path: Path) -> None:
    spec = parse_spec({"type": "supervised", "supervised": {"weight_decay": 0.5}}, None, training_records=10)
    assert spec.weight_decay == 0.5 and parse_spec(None, None, training_records=10).weight_decay is None
    with pytest.raises(InvalidRequestError, match="weight_decay"):
        parse_spec({"type": "supervised", "supervised": {"weight_decay": 2}}, None, training_records=10)
    own, _ = _fit(ToyTask(), tmp_path / "own")  # the toy task's own decay is 0
    zero, _ = _fit(ToyTask(), tmp_path / "zero", TrainingSpec(**{**SPEC.as_dict(), "weight_decay": 0.0}))
    decayed, _ = _fit(ToyTask(), tmp_path / "decayed", TrainingSpec(**{**SPEC.as_dict(), "weight_decay": 0.9}))
    weights = [(r.model_dir / "model.safetensors").read_bytes() for r in (own, zero, decayed)]
    assert weights[0] == weights[1] != weights[2]


@pytest.mark.slow
def test_a_search_runs_real_trials(
    quiet_http: TestClient, searches: SearchService, supervisor: JobSupervisor, loaded_platform: Platform
) -> None:
    request = body(
        quiet_http,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"batch_size": 4}, "adapter": {"type": "full"}},
        },
        search_space={"n_epochs": {"type": "categorical", "choices": [1, 2]}},
        sampler={"type": "grid"},
        pruner={"type": "none"},
        budget={},
    )
    search = quiet_http.post("/v1/fine_tuning/searches", headers=AUTH, json=request).json()
    runner = SearchRunner(searches, loaded_platform.jobs, loaded_platform.registry)
    try:
        for _ in range(2000):
            runner.tick()
            supervisor.tick()
            if searches.store.get(None, search["id"]).status.value in ("succeeded", "failed"):
                break
            time.sleep(0.2)
    finally:
        runner.stop()
    done = quiet_http.get(f"/v1/fine_tuning/searches/{search['id']}", headers=AUTH).json()
    assert done["status"] == "succeeded", (done, trials(quiet_http, search["id"]))
    assert done["trials"]["complete"] == 2 and done["cpu_seconds"] > 0
    best = loaded_platform.registry.get(done["fine_tuned_model"])
    assert best.task == "sequence-classification"
    assert best.extra["metrics"]["valid_accuracy"] == done["best_trial"]["value"]
    assert sorted(t["params"]["n_epochs"] for t in trials(quiet_http, search["id"])) == [1, 2]
