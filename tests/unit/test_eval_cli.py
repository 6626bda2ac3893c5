"""`llmos eval create|run|show` against the app in-process (the CLI's openai client on a TestClient)."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from llmos.cli import evals as eval_cli
from llmos.cli.main import app
from tests.conftest import ADMIN_KEY

pytestmark = pytest.mark.filterwarnings("ignore:The Evals API is deprecated:DeprecationWarning")
runner = CliRunner()
SPEC = {
    "name": "greetings",
    "data_source_config": {
        "type": "custom",
        "item_schema": {"type": "object", "properties": {"input": {"type": "string"}, "expected": {"type": "string"}}},
    },
    "testing_criteria": [
        {
            "type": "string_check",
            "name": "exact",
            "input": "{{sample.output_text}}",
            "reference": "{{item.expected}}",
            "operation": "eq",
        }
    ],
}


def test_create_run_follow_and_show(http: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = openai.OpenAI(base_url="http://testserver/v1", api_key=ADMIN_KEY, http_client=http, max_retries=0)
    monkeypatch.setattr(eval_cli, "api_client", lambda settings, key: client)
    spec = tmp_path / "eval.json"
    spec.write_text(json.dumps(SPEC))
    created = runner.invoke(app, ["eval", "create", str(spec)])
    assert created.exit_code == 0, created.output
    eval_id = created.output.strip()
    items = tmp_path / "items.jsonl"
    lines = [
        {"item": {"input": "hi", "expected": "hello"}, "sample": {"output_text": "hello"}},
        {"item": {"input": "bye", "expected": "goodbye"}, "sample": {"output_text": "see you"}},
        {"item": {"input": "thanks", "expected": "welcome"}, "sample": {"output_text": "welcome"}},
    ]
    items.write_text("\n".join(json.dumps(line) for line in lines))
    ran = runner.invoke(app, ["eval", "run", eval_id, str(items), "--name", "given", "--follow"])
    assert ran.exit_code == 0, ran.output
    assert "completed; 2 passed, 1 failed, 0 errored of 3" in " ".join(ran.output.split())  # rich wraps lines
    assert "0.667" in ran.output  # the exact criterion's pass rate

    answered = runner.invoke(
        app, ["eval", "run", eval_id, str(items), "--model", "tiny-chat", "--max-tokens", "2", "--follow"]
    )
    assert answered.exit_code == 0, answered.output
    assert "(tiny-chat): completed" in " ".join(answered.output.split())

    shown = runner.invoke(app, ["eval", "show", eval_id])
    assert shown.exit_code == 0 and "greetings" in shown.output and shown.output.count("completed") == 2
    missing = runner.invoke(app, ["eval", "show", "eval_nope"])
    assert missing.exit_code == 1 and "error" in missing.output
