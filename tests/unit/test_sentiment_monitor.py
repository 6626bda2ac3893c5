"""The sentiment monitor (examples/sentiment_monitor.py): a classifier fine-tuned on the platform
on SST-2 scores a stream of sentences, logged with their labels over time; a burst of negatives
fires the model-output drift rule; the server's metrics history holds each classifier's label
shares, which the console's Alerts page draws."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import openai
import pytest
from examples import sentiment_monitor as example

from llmos.monitoring import metrics
from llmos.platform import Platform
from tests.conftest import ADMIN_KEY
from tests.unit.test_alert_outputs import TEXTS, build_tiny_classifier, classify
from tests.unit.test_alerts import AUTH, alert_app, tick


def test_the_metrics_history_holds_each_classifiers_label_shares(
    platform: Platform, tiny_encoder_dir: Path, tmp_path: Path
) -> None:
    sentiment = "tiny-sentiment"
    platform.registry.pull(f"file:{build_tiny_classifier(tiny_encoder_dir, tmp_path / 'cls')}", name=sentiment)
    with alert_app(platform, metrics_sample_interval_s=300) as http:  # no point but the test's own
        sampler = http.app.state.metrics_sampler  # type: ignore[attr-defined]
        sampler.record_point()
        labels = [row["label"] for row in classify(http, sentiment, TEXTS)]
        # Its own answer, not the batch's: alone, a near-tie of the tiny model's may round the other way.
        labels += [row["label"] for row in classify(http, sentiment, [TEXTS[0]])]
        sampler.record_point()
        sampler.record_point()  # nothing classified since the previous point
        history = http.get("/v1/admin/metrics/history", headers=AUTH).json()["data"]
        shares = history[-2]["classification_label_shares"]
        assert shares == {sentiment: {label: round(labels.count(label) / len(labels), 4) for label in set(labels)}}
        assert history[-1]["classification_label_shares"] == {}
        page = http.get("/ui/static/alerts.js").text
        assert "classification_label_shares" in page


def sst2_rows(count: int) -> list[tuple[str, str]]:
    """Short SST-2 training sentences, half of each label (a tiny model can learn them)."""
    rows = [(text, label) for text, label in example.sst2("train") if len(text.split()) <= 6]
    negative = [r for r in rows if r[1] == "negative"][: count // 2]
    positive = [r for r in rows if r[1] == "positive"][: count // 2]
    return negative + positive


@pytest.mark.slow
def test_the_example_fine_tunes_logs_and_fires_on_a_burst_of_negatives(
    loaded_platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fresh cap on model_name labels: in a full test run the process has seen more than its limit
    # of models, and the new classifier's counts would go to "other", out of its rule's sight.
    monkeypatch.setattr(metrics, "MODEL_NAMES", metrics.LabelCap(metrics.MODEL_NAMES.limit, metrics.OTHER_MODEL))
    rows = sst2_rows(48)
    method: dict[str, Any] = {
        "type": "supervised",
        "supervised": {
            "hyperparameters": {"n_epochs": 10, "batch_size": 8, "learning_rate_multiplier": 100},
            "adapter": {"type": "full"},
            "lr_scheduler": "constant",
        },
    }
    with alert_app(loaded_platform) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key=ADMIN_KEY, http_client=http, max_retries=0)
        model = example.fine_tune(client, rows, base="tiny-embed", method=method, poll_s=0.2)
        assert client.models.retrieve(model).task == "sequence-classification"  # type: ignore[attr-defined]
        log = example.LabelLog(tmp_path / "log.sqlite")
        texts = [text for text, _ in rows]
        learned = example.classify(client, model, texts, log, 0.0)
        accuracy = sum(got == want for got, (_, want) in zip(learned, rows, strict=True)) / len(rows)
        assert accuracy >= 0.75, accuracy  # else a burst of negatives need not move its labels

        example.put_rule(client, example.drift_rule(model, window_s=10, reference_s=20, min_samples=20))
        negatives = [text for text, label in rows if label == "negative"]
        t0 = time.time()
        tick(http, t0)
        example.classify(client, model, texts, log, t0 + 1)  # the usual mix: half negative
        tick(http, t0 + 10)
        tick(http, t0 + 20)
        example.classify(client, model, negatives, log, t0 + 21)  # the burst
        tick(http, t0 + 30)
        state = example.rule_state(client)
        assert state["state"] == "firing", state
        assert state["alerts"][0]["labels"]["model_name"] == model and state["alerts"][0]["value"] >= 0.1

        _, (_, usual, n_usual), (_, burst, n_burst) = log.shares("negative", 10)
        assert (n_usual, n_burst) == (len(texts), len(negatives))
        assert burst > usual >= 0.25 and burst >= 0.75
        example.put_rule(client, example.drift_rule(model, window_s=10, reference_s=30, min_samples=20))  # replaced
        assert example.rule_state(client)["condition"]["reference_window"] in ("30s", 30, 30.0)
        log.close()
