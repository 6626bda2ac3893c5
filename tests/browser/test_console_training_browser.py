"""The console's training pages in a real browser (Debian's chromium, never `playwright install`):
a pre-training job created from the fine-tuning page's "pre-training" method on a tiny corpus and
architecture, its request as the page sent it, its per-character validation curve and samples;
and the Searches page: a search (its trials played by the test, as tests/unit/test_search.py
does) listed, its trials table, best trial, plots shown as images, and cancel."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmos.config import Settings
from tests.browser.chromium import NEEDS_CHROMIUM, signed_in, sync_api
from tests.conftest import ADMIN_KEY
from tests.fake_engine import FakeEngine
from tests.live_server import Server, free_port, serving_platform
from tests.unit.test_pretrain import TINY, corpus

pytestmark = NEEDS_CHROMIUM
WAIT_MS = 30_000
TRAINED_MS = 180_000  # a worker process starts, trains two epochs and registers the model
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHAT = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}] * 12


@contextlib.contextmanager
def _serve(home: Path, max_concurrent_jobs: int) -> Iterator[Server]:
    settings = Settings(
        home=home,
        admin_key=ADMIN_KEY,
        dtype="float32",
        host="127.0.0.1",
        port=free_port(),
        allowed_hosts=[],
        max_concurrent_jobs=max_concurrent_jobs,
    )
    with serving_platform(settings, FakeEngine()) as server:
        yield server


def _api(url: str, method: str, path: str, **kwargs: Any) -> Any:
    resp = httpx.request(method, f"{url}{path}", headers=AUTH, timeout=60, **kwargs)
    assert resp.status_code < 300, resp.text
    return resp.json()


def _upload(url: str, name: str, data: bytes, purpose: str) -> str:
    return str(_api(url, "POST", "/v1/files", files={"file": (name, data)}, data={"purpose": purpose})["id"])


def _rows(page: Any, container: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in row.locator("td").all_inner_texts()]
        for row in page.locator(f"#{container} tbody tr").all()
    ]


def _pretrain_from_page(page: Any, url: str) -> str:
    """Fill the fine-tuning page's pre-training method for a tiny Llama on a corpus, see a bad
    request refused, create the job, check the request the page sent; the job's id."""
    text = _upload(url, "verse.txt", corpus(600, seed=1).encode(), "pretrain")
    chat = _upload(url, "chat.jsonl", "\n".join(json.dumps(r) for r in CHAT).encode(), "fine-tune")
    page.goto(f"{url}/ui/fine-tuning")
    training = page.get_by_label("Training file")
    sync_api.expect(training).to_contain_text("chat.jsonl")
    vocabulary = page.get_by_label("Vocabulary size")
    sync_api.expect(vocabulary).to_be_hidden()  # pre-training's fields show only for it
    sync_api.expect(vocabulary).to_be_disabled()

    page.get_by_label("Training method").select_option("pretrain")
    sync_api.expect(vocabulary).to_be_enabled()
    sync_api.expect(page.get_by_label("Base model")).to_be_hidden()  # the preset is the model
    sync_api.expect(page.get_by_label("Rank r")).to_be_disabled()  # no adapter: every weight trains
    sync_api.expect(training).to_contain_text("verse.txt")  # text corpora, not chat lines
    assert [o for o in training.locator("option").all_inner_texts() if chat in o] == []
    page.get_by_label("Size preset").select_option("llama")
    vocabulary.fill("300")
    page.get_by_label("Epochs").fill("2")  # a validation each epoch: two points a curve
    page.get_by_label("Batch size").fill("8")
    page.get_by_label("Max sequence length").fill("32")
    page.get_by_label("Seed").fill("7")
    page.get_by_label("Sample prompt").fill("ROMEO:")
    # "llama" without its dimensions: the API's 400 naming the missing one is shown, and no job is made.
    page.get_by_role("button", name="Create job").click()
    sync_api.expect(page.locator("#notice")).to_contain_text("needs method.pretrain.architecture.")
    assert _api(url, "GET", "/v1/fine_tuning/jobs")["data"] == []

    for label, field in [
        ("Hidden size", "hidden_size"),
        ("Layers", "num_hidden_layers"),
        ("Attention heads", "num_attention_heads"),
        ("Key-value heads", "num_key_value_heads"),
        ("Intermediate size", "intermediate_size"),
    ]:
        page.get_by_label(label, exact=True).fill(str(TINY[field]))
    with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/v1/fine_tuning/jobs")) as sent:
        page.get_by_role("button", name="Create job").click()
    assert sent.value.post_data_json == {
        "model": "llama",
        "training_file": text,
        "seed": 7,
        "method": {
            "type": "pretrain",
            "pretrain": {
                "hyperparameters": {"n_epochs": 2, "batch_size": 8},
                "max_seq_length": 32,
                "architecture": TINY,
                "tokenizer": {"type": "bpe", "vocab_size": 300},
                "samples": {"prompts": ["ROMEO:"]},
            },
        },
    }
    sync_api.expect(page.locator("#pretrain-box")).to_be_visible()
    job_id = str(page.evaluate("window.location.hash.slice(1)"))
    job = _api(url, "GET", f"/v1/fine_tuning/jobs/{job_id}")
    assert job["model"] == "llama" and job["method"]["type"] == "pretrain"
    return job_id


def _expect_pretrain_views(page: Any) -> None:
    for series in ("valid loss per char", "valid loss per token"):
        curve = page.locator(f'#char-chart polyline[data-series="{series}"]')
        sync_api.expect(curve).to_have_attribute("data-points", "2")
    sync_api.expect(page.locator("#job-samples pre.sample").first).to_contain_text("ROMEO:")
    assert page.locator("#reward-box").is_hidden()


def test_a_pretraining_job_from_the_page_draws_its_loss_per_character_and_samples(browser: Any, tmp_path: Path) -> None:
    # No supervisor: the test plays the job's worker, writing the reports and the sample a real one writes.
    with _serve(tmp_path / "home", max_concurrent_jobs=0) as server:
        page = signed_in(browser, server.url, WAIT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        job_id = _pretrain_from_page(page, server.url)
        jobs = server.platform.jobs
        jobs.claim(job_id)
        for epoch, (per_token, per_char) in enumerate([(3.1, 2.2), (2.6, 1.9)], start=1):
            jobs.record_metrics(job_id, {"step": 4 * epoch, "epoch": epoch, "train_loss": per_token + 0.2})
            report = {"valid_loss": per_token, "valid_loss_per_char": per_char, "valid_bits_per_byte": per_char / 0.69}
            jobs.record_metrics(job_id, {"step": 4 * epoch, "epoch": epoch, **report})
            jobs.add_event(job_id, f"Sample: ROMEO: I love the moon {epoch}.")
        sync_api.expect(page.locator("#job-status")).to_have_attribute("data-status", "running")
        _expect_pretrain_views(page)
        sync_api.expect(page.locator("#job-samples pre.sample")).to_have_text(
            ["ROMEO: I love the moon 2.", "ROMEO: I love the moon 1."]
        )
        assert errors == []


@pytest.mark.slow  # a real worker trains for about a minute; the test above covers the page fast
def test_a_pretraining_job_from_the_page_trains_and_its_page_shows_what_the_worker_wrote(
    browser: Any, tmp_path: Path
) -> None:
    with _serve(tmp_path / "home", max_concurrent_jobs=1) as server:
        page = signed_in(browser, server.url, WAIT_MS)
        _pretrain_from_page(page, server.url)
        status = page.locator("#job-status")
        sync_api.expect(status).to_have_attribute("data-status", "succeeded", timeout=TRAINED_MS)
        _expect_pretrain_views(page)


def test_the_searches_page_lists_a_search_its_trials_best_and_plots(
    browser: Any, tmp_path: Path, tiny_encoder_dir: Path
) -> None:
    pytest.importorskip("optuna")
    from llmos.training.search.runner import SearchRunner
    from tests.unit.test_search import ROWS, Worker

    # No job supervisor and so no search runner in the server: the test ticks one and plays the trials' workers.
    with _serve(tmp_path / "home", max_concurrent_jobs=0) as server:
        platform = server.platform
        platform.registry.pull(f"file:{tiny_encoder_dir}", name="tiny-embed")
        rows = _upload(server.url, "cls.jsonl", "\n".join(json.dumps(r) for r in ROWS).encode(), "fine-tune")
        body = {
            "model": "tiny-embed",
            "training_file": rows,
            "validation_file": rows,
            "seed": 3,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 4}}},
            "search_space": {
                "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True},
                "lora_r": {"type": "categorical", "choices": [4, 8]},
            },
            "sampler": {"type": "random"},
            "pruner": {"type": "median", "n_startup_trials": 1},
            "budget": {"max_trials": 3},
        }
        search = _api(server.url, "POST", "/v1/fine_tuning/searches", json=body)["id"]
        runner = SearchRunner(server.app.state.searches, platform.jobs, platform.registry, owner="console-test")
        worker = Worker(platform, tiny_encoder_dir)
        runner.tick()  # trial 0 starts
        page = signed_in(browser, server.url, WAIT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{server.url}/ui/searches")
        sync_api.expect(page.get_by_role("link", name="Searches")).to_have_attribute("aria-current", "page")
        sync_api.expect(page.locator("#searches tbody tr")).to_have_count(1)
        assert _rows(page, "searches")[0][:5] == [search, "tiny-embed", "running", "0 / 3", "-"]
        page.get_by_role("button", name=search, exact=True).click()
        sync_api.expect(page.locator("#search-trials tbody tr")).to_have_count(1)
        sync_api.expect(page.get_by_role("button", name="Cancel search")).to_be_enabled()

        job0 = worker.job_of(server.app.state.searches, search, 0)
        worker.report(job0, 0.5, 0.6)
        model0 = worker.succeed(job0, 0.6)
        runner.tick()  # trial 0 completes, trial 1 starts
        job1 = worker.job_of(server.app.state.searches, search, 1)
        worker.report(job1, 0.2)
        runner.tick()  # below trial 0 at epoch 1: pruned
        job2 = worker.job_of(server.app.state.searches, search, 2)
        worker.report(job2, 0.7, 0.8, 0.9)
        model2 = worker.succeed(job2, 0.9)
        runner.tick()  # the budget is spent: the search finishes and writes its result files

        sync_api.expect(page.locator("#search-status")).to_have_attribute("data-status", "succeeded")
        sync_api.expect(page.locator("#search-trials tbody tr")).to_have_count(3)
        trials = _rows(page, "search-trials")
        assert [t[:3] for t in trials] == [["0", "complete", "0.6"], ["1", "pruned", "0.2"], ["2", "complete", "0.9"]]
        assert [t[4] for t in trials] == ["0.5, 0.6", "0.2", "0.7, 0.8, 0.9"]
        assert [t[6] for t in trials] == [model0, "-", model2]
        assert trials[1][7].startswith("pruned after epoch 1")
        best = _api(server.url, "GET", f"/v1/fine_tuning/searches/{search}")["best_trial"]
        shown = ", ".join(f"{k}={round(v, 4)}" for k, v in best["params"].items())
        sync_api.expect(page.locator("#best-trial")).to_have_text(
            f"trial 2: valid_accuracy 0.9 with {shown} · model {model2}"
        )
        sync_api.expect(page.locator("#searches tbody tr").first).to_contain_text("3 / 3")
        sync_api.expect(page.get_by_role("button", name="Cancel search")).to_be_disabled()

        plots = page.locator("#search-plots img")
        sync_api.expect(plots).to_have_count(3)
        page.wait_for_function(
            "() => [...document.querySelectorAll('#search-plots img')].every((i) => i.complete && i.naturalWidth > 0)"
        )
        assert sorted(plots.evaluate_all("(imgs) => imgs.map((i) => i.dataset.file)")) == [
            "optimization_history.png",
            "parallel_coordinate.png",
            "param_importances.png",
        ]
        sync_api.expect(page.locator("#search-files a")).to_have_count(4)  # the plots and the trials CSV
        assert errors == []

        # A second search, cancelled from its page: its runner is asked to stop it.
        second = _api(server.url, "POST", "/v1/fine_tuning/searches", json=body)["id"]
        page.get_by_role("button", name=second, exact=True).click()  # listed at the page's next poll
        sync_api.expect(page.locator("#h-search")).to_have_text(f"Search {second}")
        page.get_by_role("button", name="Cancel search").click()
        sync_api.expect(page.locator("#search-status")).to_have_attribute("data-status", "cancelling")
        assert _api(server.url, "GET", f"/v1/fine_tuning/searches/{second}")["status"] == "cancelling"
