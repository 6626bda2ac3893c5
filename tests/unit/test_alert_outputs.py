"""Model-output rules: a classifier's label shares against a reference window, and its mean
confidence leaving a band, fed by real requests to /v1/classifications (the financial-sentiment
scenario: a burst of negative news fires an alert)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from llmos.monitoring.alerts.drift import chisquare_p_value, jensen_shannon_distance
from llmos.monitoring.alerts.functions import histogram_quantile
from llmos.platform import Platform
from tests.alert_receivers import webhook_receiver
from tests.tiny_models import CORPUS
from tests.unit.test_alerts import AUTH, alert_app, tick

TEXTS = [
    *sorted(set(CORPUS)),
    "stocks fall sharply",
    "profits rise",
    "the bank cut its forecast",
    "markets are calm today",
    "a quick brown dog",
    "the sea and the stars",
    "paris is the capital",
    "how are you",
]


def build_tiny_classifier(encoder_dir: Path, root: Path) -> Path:
    """A sequence-classification head (negative, positive) on the tiny encoder, random but fixed."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    root.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (encoder_dir / name).exists():
            shutil.copy(encoder_dir / name, root / name)
    config = BertConfig.from_pretrained(encoder_dir)
    config.num_labels = 2
    config.id2label = {0: "negative", 1: "positive"}
    config.label2id = {"negative": 0, "positive": 1}
    config.architectures = ["BertForSequenceClassification"]
    torch.manual_seed(7)
    model = BertForSequenceClassification(config).eval()
    # A random head scores every text about alike; point it along the direction in which the test's
    # texts' pooled outputs differ most, centred and scaled, so that they split into confident halves.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root)
    with torch.no_grad():
        pooled = torch.stack([model.bert(**tokenizer(t, return_tensors="pt")).pooler_output[0] for t in TEXTS])
        centre = pooled.mean(0)
        direction = torch.linalg.svd(pooled - centre).Vh[0]
        projections = (pooled - centre) @ direction
        scale = 20 / float(projections.std())
        model.classifier.weight.zero_()
        model.classifier.weight[1] = scale * direction
        model.classifier.bias.zero_()
        model.classifier.bias[1] = -scale * (centre @ direction + projections.median())
    model.save_pretrained(root, safe_serialization=True)
    return root


@pytest.fixture
def sentiment(platform: Platform, tiny_encoder_dir: Path, tmp_path: Path) -> str:
    platform.registry.pull(f"file:{build_tiny_classifier(tiny_encoder_dir, tmp_path / 'cls')}", name="tiny-sentiment")
    return "tiny-sentiment"


def classify(http: TestClient, model: str, texts: list[str]) -> list[dict[str, Any]]:
    resp = http.post("/v1/classifications", headers=AUTH, json={"model": model, "input": texts})
    assert resp.status_code == 200, resp.text
    return resp.json()["data"]


def test_a_jump_in_the_negative_share_fires_a_drift_alert(platform: Platform, sentiment: str) -> None:
    rules = [
        {
            "name": "SentimentShift",
            "condition": {"kind": "label_drift", "model": sentiment, "window": "10s", "reference_window": "20s",
                          "min_samples": 10},
            "op": ">=",
            "threshold": 0.1,  # Evidently's Jensen-Shannon threshold
            "severity": "warning",
            "annotations": {"summary": "labels of {{ $labels.model_name }} moved: distance {{ $value }}"},
        },
        {
            "name": "SentimentShiftChi2",
            "condition": {"kind": "label_drift", "method": "chisquare", "window": "10s", "reference_window": "20s",
                          "min_samples": 10},
            "op": "<",
            "threshold": 0.05,
        },
    ]  # fmt: skip
    with webhook_receiver() as hook, alert_app(platform, alert_webhook_urls=[SecretStr(hook.url)]) as http:
        for rule in rules:
            assert http.post("/v1/admin/alerts/rules", headers=AUTH, json=rule).status_code == 201
        labelled: dict[str, list[str]] = {"negative": [], "positive": []}
        for text, out in zip(TEXTS, classify(http, sentiment, TEXTS), strict=True):
            if out["score"] > 0.9:  # far from the boundary: the same label in any batch
                labelled[out["label"]].append(text)
        negative, positive = labelled["negative"], labelled["positive"]
        assert negative and positive, labelled

        t0 = time.time()
        tick(http, t0)
        classify(http, sentiment, (positive * 9 + negative)[:20])  # the reference: mostly positive news
        tick(http, t0 + 10)
        tick(http, t0 + 20)
        classify(http, sentiment, (positive * 2 + negative * 9)[:4] + negative * 16)  # the current window: a burst
        changes = http.app.state.alerts.tick(t0 + 30)  # type: ignore[attr-defined]
        assert http.app.state.alerts.notifier.wait_idle(10)  # type: ignore[attr-defined]
        assert {(c.alert.rule, c.alert.state.value) for c in changes} >= {
            ("SentimentShift", "firing"),
            ("SentimentShiftChi2", "firing"),
        }
        states = {s["rule"]: s for s in http.get("/v1/admin/alerts", headers=AUTH).json()["data"]}
        (alert,) = states["SentimentShift"]["alerts"]
        assert alert["labels"]["model_name"] == sentiment and alert["value"] >= 0.1
        assert states["SentimentShiftChi2"]["alerts"][0]["value"] < 0.05
        sent = {p["groupLabels"]["alertname"]: p for p in hook.payloads}
        assert sent["SentimentShift"]["alerts"][0]["labels"]["model_name"] == sentiment
        assert sent["SentimentShift"]["alerts"][0]["annotations"]["summary"].startswith(
            f"labels of {sentiment} moved: distance 0."
        )

        for at in (40, 50, 60):  # the usual mix again, until the burst has left the reference too
            classify(http, sentiment, (positive * 9 + negative)[:20])
            tick(http, t0 + at)
            if at == 50:  # the burst is the reference now: still unlike the current mix
                assert http.get("/v1/admin/alerts/rules/SentimentShift", headers=AUTH).json()["state"] == "firing"
        assert http.get("/v1/admin/alerts/rules/SentimentShift", headers=AUTH).json()["state"] == "resolved"


def test_a_steady_mix_does_not_fire(platform: Platform, sentiment: str) -> None:
    rule = {
        "name": "SentimentShift",
        "condition": {"kind": "label_drift", "window": "10s", "reference_window": "10s", "min_samples": 5},
        "op": ">=",
        "threshold": 0.1,
    }
    with alert_app(platform) as http:
        assert http.post("/v1/admin/alerts/rules", headers=AUTH, json=rule).status_code == 201
        t0 = time.time()
        tick(http, t0)
        classify(http, sentiment, TEXTS)
        tick(http, t0 + 10)
        classify(http, sentiment, TEXTS)
        tick(http, t0 + 20)
        assert http.get("/v1/admin/alerts/rules/SentimentShift", headers=AUTH).json()["state"] == "inactive"


def test_mean_confidence_leaving_its_band_fires(platform: Platform, sentiment: str) -> None:
    rule = {
        "name": "UnsureSentiment",
        "condition": {"kind": "mean_confidence", "window": "10s", "min_samples": 5},
        "op": "outside",
        "threshold": [0.999, 1.0],  # the texts near its boundary score near 0.5
    }
    with alert_app(platform) as http:
        assert http.post("/v1/admin/alerts/rules", headers=AUTH, json=rule).status_code == 201
        t0 = time.time()
        tick(http, t0)
        scores = [d["score"] for d in classify(http, sentiment, TEXTS)]
        tick(http, t0 + 5)
        rule_now = http.get("/v1/admin/alerts/rules/UnsureSentiment", headers=AUTH).json()
        assert rule_now["state"] == "firing"
        assert rule_now["alerts"][0]["value"] == pytest.approx(sum(scores) / len(scores), rel=1e-6)


def test_drift_measures_match_evidentlys_definitions() -> None:
    assert jensen_shannon_distance([50, 50], [50, 50]) == pytest.approx(0.0)
    assert jensen_shannon_distance([100, 0], [0, 100]) == pytest.approx(1.0, abs=0.01)  # base 2: at most 1
    # By hand: m = (0.75, 0.25), KL(p||m) = 0.1045 and KL(q||m) = 0.0781 bits, sqrt(mean) = 0.3022.
    assert jensen_shannon_distance([90, 10], [60, 40]) == pytest.approx(0.3022, abs=1e-4)
    assert chisquare_p_value([90, 10], [88, 12]) > 0.05
    assert chisquare_p_value([90, 10], [20, 80]) < 1e-6
    assert chisquare_p_value([10], [30]) == 1.0


def test_histogram_quantile_follows_prometheus() -> None:
    inf = float("inf")
    buckets = [(0.1, 10.0), (0.5, 60.0), (1.0, 100.0), (inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * (50 - 10) / 50)
    assert histogram_quantile(0.99, [(1.0, 0.0), (inf, 10.0)]) == 1.0  # in +Inf: the highest finite bound
    assert histogram_quantile(0.5, [(1.0, 0.0), (inf, 0.0)]) is None
