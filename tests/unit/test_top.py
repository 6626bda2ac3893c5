"""`llmos top` draws a frame from a server's scraped /metrics text (no live terminal needed)."""

from __future__ import annotations

from fastapi.testclient import TestClient
from rich.console import Console
from typer.testing import CliRunner

from llmos.cli.main import app
from llmos.cli.top import parse, render
from tests.conftest import ADMIN_KEY

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6}


def frame(renderable: object) -> str:
    console = Console(record=True, width=140, color_system=None)
    console.print(renderable)
    return console.export_text()


def cells(text: str, first: str) -> list[str]:
    line = next(line for line in text.splitlines() if first in line)
    return [cell.strip() for cell in line.split("│") if cell.strip()]


def test_a_frame_from_a_real_scrape(http: TestClient) -> None:
    first = parse(http.get("/metrics", headers=ADMIN).text, taken=100.0)
    assert http.post("/v1/chat/completions", headers=ADMIN, json=CHAT).status_code == 200
    second = parse(http.get("/metrics", headers=ADMIN).text, taken=102.0)
    alerts = [
        {"rule": "HighErrorRate", "severity": "critical", "state": "firing"},
        {"rule": "QueueDepth", "severity": "warning", "state": "inactive"},
    ]
    text = frame(render(second, first, alerts, "http://testserver"))
    # 6 tokens generated between two scrapes 2 s apart: 3.0 tokens/s; nothing running now.
    assert cells(text, "tiny-chat")[1:5] == ["0", "0", "0", "3.0"]
    assert "firing alerts: HighErrorRate (critical)" in text
    assert "QueueDepth" not in text
    assert "Fine-tuning jobs" in text


CAPTURED = """\
# TYPE llmos_num_requests_running gauge
llmos_num_requests_running{model_name="smollm2"} 5.0
# TYPE llmos_num_requests_waiting gauge
llmos_num_requests_waiting{model_name="smollm2"} 7.0
# TYPE llmos_batch_current_size gauge
llmos_batch_current_size{model_name="smollm2"} 16.0
# TYPE llmos_kv_cache_usage_perc gauge
llmos_kv_cache_usage_perc{model_name="smollm2"} 0.425
# TYPE llmos_lora_adapters_loaded gauge
llmos_lora_adapters_loaded{model_name="smollm2"} 3.0
# TYPE llmos_model_memory_bytes gauge
llmos_model_memory_bytes{model_name="smollm2"} 2.69e+08
# TYPE llmos_generation_tokens counter
llmos_generation_tokens_total{model_name="smollm2",tenant="acme"} 1000.0
llmos_generation_tokens_total{model_name="smollm2",tenant="default"} 500.0
# TYPE llmos_fine_tuning_jobs gauge
llmos_fine_tuning_jobs{status="running"} 1.0
llmos_fine_tuning_jobs{status="succeeded"} 4.0
# TYPE llmos_training_loss gauge
llmos_training_loss{job_id="ftjob-abc"} 1.2345
# TYPE llmos_training_accuracy gauge
llmos_training_accuracy{job_id="ftjob-abc"} 0.61
# TYPE llmos_training_tokens_per_second gauge
llmos_training_tokens_per_second{job_id="ftjob-abc"} 812.0
# TYPE llmos_engine_restarts gauge
llmos_engine_restarts 2.0
"""


def test_a_frame_from_captured_text() -> None:
    before = parse(CAPTURED, taken=10.0)
    later = CAPTURED.replace("} 1000.0", "} 1300.0")  # 300 more tokens in 2 s for tenant acme
    text = frame(render(parse(later, taken=12.0), before, None, "http://x:8000"))
    assert cells(text, "smollm2") == ["smollm2", "5", "7", "16", "150.0", "42.5%", "3", "256.5 MB"]
    assert cells(text, "ftjob-abc") == ["ftjob-abc", "1.2345", "61.0%", "812"]
    assert "engine restarts: 2" in text and "running 1" in text and "succeeded 4" in text
    assert "needs admin" in text


def test_top_once_reports_an_unreachable_server() -> None:
    result = CliRunner().invoke(app, ["top", "--once", "--url", "http://127.0.0.1:9", "--api-key", "k"])
    assert result.exit_code == 1
    assert "cannot reach" in result.output
