"""The web console in a real browser: Playwright driving Debian's chromium (never `playwright
install`) against the server on loopback with the tiny test models. Sign-in, models and a pull
followed live, streamed chat, classification and entities marked in the text, a fine-tuning
job's loss curve growing, a DPO job started from the page with its reward margin drawn, a
tenant that sees only its own jobs, an alert firing, wrong keys, ended sessions and CSRF-less
requests. A screenshot of every page is written under the pytest temporary directory
(``console-screenshots``)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmos.api import create_app
from llmos.api.console.pages import PAGES
from llmos.config import Settings
from llmos.platform import Platform
from tests.browser.chromium import NEEDS_CHROMIUM, launched, signed_in, sync_api
from tests.conftest import ADMIN_KEY
from tests.live_server import free_port, serving
from tests.unit.test_alert_outputs import build_tiny_classifier
from tests.unit.test_dpo import PAIRS
from tests.unit.test_ner import _fixed_tagger

pytestmark = [
    pytest.mark.slow,  # about a minute; tests/unit/test_console.py covers sessions and CSRF fast
    NEEDS_CHROMIUM,
]
WAIT_MS = 60_000
ROWS = [
    {"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": "Paris is in France."}]}
    for i in range(12)
]


@dataclass
class Console:
    url: str
    app: Any
    platform: Platform
    tiny_chat_dir: Path
    acme_key: str
    other_job: str
    shots: Path


def _api(url: str, key: str, method: str, path: str, **kwargs: Any) -> Any:
    resp = httpx.request(method, f"{url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=30, **kwargs)
    assert resp.status_code < 300, resp.text
    return resp.json()


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, tiny_chat_dir: Path, tiny_encoder_dir: Path) -> Iterator[Console]:
    home = tmp_path_factory.mktemp("console") / "home"
    settings = Settings(
        home=home,
        admin_key=ADMIN_KEY,
        dtype="float32",
        batch_wait_ms=20,
        host="127.0.0.1",
        port=free_port(),
        allowed_hosts=[],
        alert_evaluation_interval_s=1.0,  # an alert fires within seconds of its rule
    )
    platform = Platform.open(settings)
    platform.registry.pull(f"file:{tiny_chat_dir}", name="tiny-chat")
    platform.registry.pull(f"file:{tiny_encoder_dir}", name="tiny-embed")
    models = tmp_path_factory.mktemp("console-models")
    platform.registry.pull(f"file:{build_tiny_classifier(tiny_encoder_dir, models / 'cls')}", name="tiny-sentiment")
    platform.registry.pull(f"file:{_fixed_tagger(tiny_encoder_dir, models / 'ner', 'B-MISC')}", name="tiny-tagger")
    for tenant in ("acme", "other"):
        platform.tenants.create(tenant)
    _, acme_key = platform.keys.create("acme-console", tenant="acme", scopes=("inference", "files", "fine-tune"))
    _, other_key = platform.keys.create("other-api", tenant="other", scopes=("inference", "files", "fine-tune"))
    app = create_app(settings, platform=platform)
    with serving(app, settings) as url:
        # Another tenant's job, which acme's key must never see.
        data = "\n".join(json.dumps(r) for r in ROWS).encode()
        file_id = _api(
            url, other_key, "POST", "/v1/files", files={"file": ("t.jsonl", data)}, data={"purpose": "fine-tune"}
        )
        body = {"model": "tiny-chat", "training_file": file_id["id"], "suffix": "secret"}
        other_job = _api(url, other_key, "POST", "/v1/fine_tuning/jobs", json=body)["id"]
        _api(url, other_key, "POST", f"/v1/fine_tuning/jobs/{other_job}/cancel")
        shots = tmp_path_factory.mktemp("console-screenshots")
        yield Console(url, app, platform, tiny_chat_dir, acme_key, other_job, shots)
    platform.close()


@pytest.fixture(scope="module")
def browser(console: Console) -> Iterator[Any]:
    with launched() as browser:
        yield browser


def _signed_in(browser: Any, console: Console, key: str = ADMIN_KEY) -> Any:
    return signed_in(browser, console.url, WAIT_MS, key)


def test_a_wrong_key_is_refused_and_the_right_one_signs_in(browser: Any, console: Console) -> None:
    page = browser.new_page()
    page.goto(f"{console.url}/ui/")
    page.get_by_label("API key").fill("sk-llmos-000000000000-notarealkeynotarealkey")
    page.get_by_role("button", name="Sign in").click()
    sync_api.expect(page.locator("#login-error")).to_contain_text("Incorrect API key")
    page.screenshot(path=str(console.shots / "login-refused.png"))
    # The keyboard alone signs in: the key field has focus, Enter submits.
    page.keyboard.type(ADMIN_KEY)
    page.keyboard.press("Enter")
    page.wait_for_url("**/ui/overview")
    page.keyboard.press("Tab")
    sync_api.expect(page.locator(".skip")).to_be_focused()
    sync_api.expect(page.locator("#health-state")).to_have_text("Ready")
    sync_api.expect(page.locator("#resident")).to_contain_text("in use")


def test_every_page_renders_and_is_captured(browser: Any, console: Console) -> None:
    page = _signed_in(browser, console)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    for entry in PAGES:
        page.goto(f"{console.url}/ui/{entry.slug}")
        sync_api.expect(page.locator("h1")).to_have_text(entry.title)
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(console.shots / f"{entry.slug}.png"), full_page=True)
    assert errors == []
    assert len(list(console.shots.glob("*.png"))) >= len(PAGES)


def test_models_are_listed_and_a_pull_is_followed_to_its_end(browser: Any, console: Console) -> None:
    page = _signed_in(browser, console)
    page.goto(f"{console.url}/ui/models")
    sync_api.expect(page.locator('#model-tree [data-model="tiny-chat"]')).to_be_visible()
    page.get_by_label("Catalog name or source URI").fill(f"file:{console.tiny_chat_dir}")
    page.get_by_label("Register as (optional)").fill("tiny-pulled")
    page.get_by_role("button", name="Pull", exact=True).click()
    pull = page.locator("#pulls .pull").first
    sync_api.expect(pull).to_have_attribute("data-status", "succeeded")
    sync_api.expect(pull).to_contain_text("registered tiny-pulled@1")
    sync_api.expect(page.locator('#model-tree [data-model="tiny-pulled"]')).to_be_visible()
    page.screenshot(path=str(console.shots / "models-pulled.png"), full_page=True)


def test_chat_in_the_playground_streams_text(browser: Any, console: Console) -> None:
    page = _signed_in(browser, console)
    page.goto(f"{console.url}/ui/playground")
    sync_api.expect(page.get_by_label("Model or adapter")).to_have_value("tiny-chat")
    page.get_by_label("Compare with (optional)").select_option("tiny-chat")
    page.get_by_label("Max tokens").fill("12")
    page.get_by_label("Message", exact=True).fill("Hello there")
    page.get_by_role("button", name="Send").click()
    for pane in ("#out-a", "#out-b"):
        answer = page.locator(pane)
        sync_api.expect(answer).to_have_attribute("data-state", "done")
        assert answer.inner_text().strip(), f"no streamed text in {pane}"
    page.get_by_label("First text").fill("a cat")
    page.get_by_label("Second text").fill("a kitten")
    page.get_by_role("button", name="Compare").click()
    sync_api.expect(page.locator("#embed-out")).to_contain_text("Cosine similarity: ")
    page.screenshot(path=str(console.shots / "playground-chat.png"), full_page=True)


def test_classification_and_entities_are_marked_in_the_text(browser: Any, console: Console) -> None:
    page = _signed_in(browser, console)
    page.goto(f"{console.url}/ui/playground")
    text = "stocks fall sharply in Paris"
    # The tagger marks every word as one MISC entity; the classifier's label is the API's own.
    page.get_by_label("Classifier or NER model").select_option("tiny-tagger")
    page.get_by_label("Text", exact=True).fill(text)
    page.get_by_role("button", name="Run").click()
    marks = page.locator("#classify-out mark.entity")
    sync_api.expect(marks).to_have_count(len(text.split()))
    assert [m.get_attribute("data-entity") for m in marks.all()] == ["MISC"] * len(text.split())
    assert [m.evaluate("m => m.firstChild.textContent") for m in marks.all()] == text.split()
    assert page.locator("#classify-out").evaluate("o => o.textContent.replace(/MISC/g, '')") == text
    page.screenshot(path=str(console.shots / "playground-entities.png"), full_page=True)
    expected = _api(
        console.url, ADMIN_KEY, "POST", "/v1/classifications", json={"model": "tiny-sentiment", "input": text}
    )
    page.get_by_label("Classifier or NER model").select_option("tiny-sentiment")
    page.get_by_role("button", name="Run").click()
    label = page.locator("#classify-out mark.label")
    sync_api.expect(label).to_have_attribute("data-label", expected["data"][0]["label"])
    assert label.evaluate("m => m.firstChild.textContent") == text
    sync_api.expect(page.locator("#classify-out .bar")).to_have_count(2)
    page.screenshot(path=str(console.shots / "playground-classification.png"), full_page=True)


def test_an_alert_fires_on_the_alerts_page_and_the_overview(browser: Any, console: Console) -> None:
    """A rule over the server's own request rate (the pages' polling feeds it) fires within
    seconds; the alerts page shows its state and history, the overview lists it as firing."""
    rule = {
        "name": "ConsoleTraffic",
        "condition": {"kind": "rate", "metric": "llmos_http_requests_total", "window": "30s"},
        "op": ">",
        "threshold": 0,
        "severity": "warning",
        "annotations": {"summary": "{{ $value }} requests per second"},
    }
    _api(console.url, ADMIN_KEY, "POST", "/v1/admin/alerts/rules", json=rule)
    try:
        page = _signed_in(browser, console)
        page.goto(f"{console.url}/ui/alerts")
        state = page.locator("#states tr", has_text="ConsoleTraffic").locator("[data-state]")
        # The page redraws every 5 s; its polls are the traffic, hence a window of several polls.
        sync_api.expect(state).to_have_attribute("data-state", "firing", timeout=20_000)
        sync_api.expect(page.locator("#history tr", has_text="ConsoleTraffic").first).to_contain_text("firing")
        page.screenshot(path=str(console.shots / "alerts-firing.png"), full_page=True)
        page.goto(f"{console.url}/ui/overview")
        firing = page.locator("#alerts tr", has_text="ConsoleTraffic")
        sync_api.expect(firing).to_contain_text("firing")
        sync_api.expect(firing).to_contain_text("warning")
        page.screenshot(path=str(console.shots / "overview-alert.png"), full_page=True)
    finally:
        _api(console.url, ADMIN_KEY, "DELETE", "/v1/admin/alerts/rules/ConsoleTraffic")


def test_a_fine_tuning_job_shows_its_loss_curve_growing(browser: Any, console: Console, tmp_path: Path) -> None:
    page = _signed_in(browser, console, console.acme_key)
    page.goto(f"{console.url}/ui/files")
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in ROWS))
    page.get_by_label("File", exact=True).set_input_files(str(train))
    page.get_by_role("button", name="Upload").click()
    sync_api.expect(page.locator("#upload-status")).to_contain_text("Uploaded train.jsonl")
    page.goto(f"{console.url}/ui/fine-tuning")
    sync_api.expect(page.get_by_label("Training file")).to_contain_text("train.jsonl")
    # 600 steps (50 epochs, the most, of 12 single-row steps): two polls 2 s apart see the curve
    # grow, and the job is still running when the test cancels it (120 steps ended first once).
    page.get_by_label("Epochs").fill("50")
    page.get_by_label("Batch size").fill("1")
    page.get_by_label("Rank r").fill("4")
    page.get_by_role("button", name="Create job").click()
    sync_api.expect(page.locator("#job-detail")).to_be_visible()
    line = page.locator('#loss-chart polyline[data-series="train loss"]')
    sync_api.expect(line).to_have_count(1, timeout=120_000)
    first = int(line.get_attribute("data-points") or 0)
    page.wait_for_function(
        "n => Number(document.querySelector('#loss-chart polyline[data-series=\"train loss\"]')"
        "?.getAttribute('data-points')) > n",
        arg=first,
        timeout=120_000,
    )
    page.screenshot(path=str(console.shots / "fine-tuning-loss.png"), full_page=True)
    # acme's key sees its own job, never the other tenant's, nor the admin pages.
    own = page.evaluate("window.location.hash.slice(1)")
    sync_api.expect(page.locator("#jobs")).to_contain_text(own)  # the list is there, so an absence means something
    jobs = page.locator("#jobs").inner_text()
    assert console.other_job not in jobs
    assert page.locator('nav a[href="/ui/admin"]').count() == 0
    page.get_by_role("button", name="Cancel").click()
    sync_api.expect(page.locator("#job-status")).to_have_attribute("data-status", "cancelled")


def test_a_dpo_job_from_the_console_shows_its_reward_margin(browser: Any, console: Console) -> None:
    def upload(name: str, rows: list[dict[str, Any]]) -> str:
        data = "\n".join(json.dumps(r) for r in rows).encode()
        sent = {"files": {"file": (name, data)}, "data": {"purpose": "fine-tune"}}
        return str(_api(console.url, console.acme_key, "POST", "/v1/files", **sent)["id"])

    pairs, chat = upload("pairs.jsonl", PAIRS), upload("chat.jsonl", ROWS)

    def job_ids() -> list[str]:
        return [j["id"] for j in _api(console.url, console.acme_key, "GET", "/v1/fine_tuning/jobs")["data"]]

    jobs_before = job_ids()
    page = _signed_in(browser, console, console.acme_key)
    page.goto(f"{console.url}/ui/fine-tuning")
    sync_api.expect(page.get_by_label("Training file")).to_contain_text("pairs.jsonl")
    beta = page.get_by_label("DPO beta")
    sync_api.expect(beta).to_be_disabled()  # beta is DPO's alone
    page.get_by_label("Training method").select_option("dpo")
    beta.fill("0.2")
    page.get_by_label("Epochs").fill("3")  # a validation report each epoch: three points on the margin's curve
    page.get_by_label("Batch size").fill("3")
    page.get_by_label("Rank r").fill("4")
    # Chat lines cannot train DPO: the API's refusal is shown and no job is made.
    page.get_by_label("Training file").select_option(chat)
    page.get_by_role("button", name="Create job").click()
    sync_api.expect(page.locator("#notice")).to_contain_text("preference lines")
    assert job_ids() == jobs_before
    page.get_by_label("Training file").select_option(pairs)
    page.get_by_label("Validation file (optional)").select_option(pairs)
    page.get_by_role("button", name="Create job").click()
    sync_api.expect(page.locator("#reward-box")).to_be_visible(timeout=WAIT_MS)
    job_id = page.evaluate("window.location.hash.slice(1)")
    method = _api(console.url, console.acme_key, "GET", f"/v1/fine_tuning/jobs/{job_id}")["method"]
    assert method["type"] == "dpo" and method["dpo"]["hyperparameters"]["beta"] == 0.2
    sync_api.expect(page.locator("#job-status")).to_have_attribute("data-status", "succeeded", timeout=120_000)
    margin = page.locator('#reward-chart polyline[data-series="valid reward margin"]')
    sync_api.expect(margin).to_have_attribute("data-points", "3")
    accuracy = page.locator('#accuracy-chart polyline[data-series="valid preference accuracy"]')
    sync_api.expect(accuracy).to_have_attribute("data-points", "3")
    sync_api.expect(page.locator('#accuracy-chart polyline[data-series="train preference accuracy"]')).to_have_count(1)
    sync_api.expect(page.locator('#loss-chart polyline[data-series="valid loss"]')).to_have_attribute(
        "data-points", "3"
    )
    page.screenshot(path=str(console.shots / "fine-tuning-dpo.png"), full_page=True)


def test_an_invalid_upload_shows_the_apis_error(browser: Any, console: Console, tmp_path: Path) -> None:
    page = _signed_in(browser, console, console.acme_key)
    page.goto(f"{console.url}/ui/files")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    page.get_by_label("File", exact=True).set_input_files(str(bad))
    page.get_by_role("button", name="Upload").click()
    status = page.locator("#upload-status")
    sync_api.expect(status).to_have_class("error")
    sync_api.expect(status).to_contain_text("line")
    page.screenshot(path=str(console.shots / "files-refused.png"), full_page=True)


def test_an_ended_session_goes_back_to_sign_in(browser: Any, console: Console) -> None:
    page = _signed_in(browser, console)
    console.app.state.console_sessions._sessions.clear()  # as a restart or the session's end would
    # The overview's own poll may get the 401 first and already be on its way to sign-in.
    with contextlib.suppress(sync_api.Error):
        page.goto(f"{console.url}/ui/models")
    page.wait_for_url("**/ui/login?ended=1")
    sync_api.expect(page.locator("main")).to_contain_text("Your session has ended")


def test_a_post_without_the_csrf_token_is_refused_and_changes_nothing(browser: Any, console: Console) -> None:
    page = _signed_in(browser, console)
    before = [t.id for t in console.platform.tenants.list()]
    answer = page.evaluate(
        """async () => {
            const resp = await fetch('/v1/admin/tenants', {method: 'POST', credentials: 'same-origin',
                headers: {'Content-Type': 'application/json'}, body: JSON.stringify({id: 'forged'})});
            return [resp.status, await resp.json()];
        }"""
    )
    assert answer[0] == 403
    assert answer[1]["error"]["code"] == "csrf_failed"
    assert [t.id for t in console.platform.tenants.list()] == before
