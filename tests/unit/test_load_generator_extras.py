"""vLLM's request extras that load generators such as guidellm send: ``ignore_eos`` (generate to
``max_tokens`` past the end token) and ``stream_options.continuous_usage_stats`` (the usage so
far on every chunk)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM

from llmos.platform import Platform
from tests.conftest import ADMIN_KEY

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROMPT = [5, 6, 7, 8, 9]


def model_ending_at_once(tiny_chat_dir: Path, root: Path) -> Path:
    """A copy of the tiny model whose end token is the token it greedily writes after ``PROMPT``."""
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32)
        first = int(model(torch.tensor([PROMPT])).logits[0, -1].argmax())
    shutil.copytree(tiny_chat_dir, root)
    for name in ("config.json", "generation_config.json"):
        path = root / name
        if path.exists():
            config = json.loads(path.read_text())
            config["eos_token_id"] = first
            path.write_text(json.dumps(config))
    return root


def complete(http: TestClient, **extra: Any) -> dict[str, Any]:
    body = {"model": "tiny-ends", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, **extra}
    resp = http.post("/v1/completions", headers=AUTH, json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_ignore_eos_generates_to_max_tokens(
    http: TestClient, loaded_platform: Platform, tiny_chat_dir: Path, tmp_path: Path
) -> None:
    loaded_platform.registry.pull(f"file:{model_ending_at_once(tiny_chat_dir, tmp_path / 'ends')}", name="tiny-ends")
    ended = complete(http)
    assert ended["choices"][0]["finish_reason"] == "stop" and ended["usage"]["completion_tokens"] <= 1
    kept = complete(http, ignore_eos=True)
    assert kept["choices"][0]["finish_reason"] == "length" and kept["usage"]["completion_tokens"] == 6
    refused = http.post("/v1/completions", headers=AUTH, json={"model": "tiny-ends", "prompt": "x", "ignore_eos": 1})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "ignore_eos"


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(http: TestClient) -> None:
    body = {
        "model": "tiny-chat",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    with http.stream("POST", "/v1/chat/completions", headers=AUTH, json=body) as resp:
        assert resp.status_code == 200
        chunks = [json.loads(line[6:]) for line in resp.iter_lines() if line and line != "data: [DONE]"]
    *streamed, last = chunks
    content = [c for c in streamed if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert content and all(c["usage"] is not None for c in content)
    counts = [c["usage"]["completion_tokens"] for c in content]
    assert counts == sorted(counts) and counts[-1] <= last["usage"]["completion_tokens"] == 5
    assert all(c["usage"]["prompt_tokens"] == last["usage"]["prompt_tokens"] for c in content)
