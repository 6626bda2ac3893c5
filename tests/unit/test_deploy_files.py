"""The Grafana dashboard and the Prometheus rules in deploy/ name only metrics that /metrics serves."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ADMIN_KEY

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
METRIC = re.compile(r"\b((?:llmos|process)_[a-z0-9_]+)")
SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def _expressions() -> dict[str, list[str]]:
    dashboard = json.loads((DEPLOY / "grafana" / "llmos.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "llmos-rules.yml").read_text())
    rule_exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    return {"grafana": exprs, "prometheus": rule_exprs}


def _served(http: TestClient) -> set[str]:
    resp = http.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert resp.status_code == 200
    names = set()
    for family in text_string_to_metric_families(resp.text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def _family(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def test_every_metric_the_deploy_files_name_is_served(http: TestClient) -> None:
    served = _served(http)
    for source, exprs in _expressions().items():
        named = {m for expr in exprs for m in METRIC.findall(expr)}
        assert len(named) >= 5, source
        missing = sorted(m for m in named if m not in served and _family(m) not in served)
        assert not missing, f"{source} names metrics that /metrics does not serve: {missing}"
    assert "llmos_time_to_first_token_seconds" in served and "llmos_generation_tokens" in served
