"""lm-evaluation-harness through the chat API (``local-chat-completions``; the server applies the
chat template) generates what the same weights generate in-process (``--model hf`` applying the
same template): SmolLM2 answering SST-2 reviews' sentiment, greedy, both in float32."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmos.config import Settings
from llmos.platform import Platform
from tests.integration.conftest import ADMIN_KEY, Server, start_server, stop_server

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is a dev extra")

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "tests" / "lm_eval_tasks"
MODEL = "smollm2-135m-instruct"
LIMIT = 40


def generate(model: str, model_args: str) -> tuple[float, dict[int, str]]:
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["llmos_sst2_gen"],
        task_manager=TaskManager(include_path=str(TASKS)),
        limit=LIMIT,
        batch_size=1,
        log_samples=True,
        apply_chat_template=True,
    )
    assert results is not None
    answers = {s["doc_id"]: s["resps"][0][0] for s in results["samples"]["llmos_sst2_gen"]}
    return float(results["results"]["llmos_sst2_gen"]["exact_match,label"]), answers


@pytest.mark.slow
def test_local_chat_completions_generates_what_the_weights_generate(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not (ROOT.parent / "shared" / "datasets" / "sst2" / "dev.tsv").is_file():
        pytest.skip("../shared/datasets is not here")
    monkeypatch.chdir(ROOT)  # the task file names its data relative to the repository root
    monkeypatch.setenv("OPENAI_API_KEY", ADMIN_KEY)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert server.client().models.retrieve(MODEL)  # pulled by the session's server
    platform = Platform.open(Settings(home=server.home))
    try:
        weights = platform.registry.model_dir(platform.registry.get(MODEL))
    finally:
        platform.close()
    in_process, expected = generate("hf", f"pretrained={weights},dtype=float32,device=cpu")
    f32 = start_server(server.home, dtype="float32")
    try:
        served, got = generate(
            "local-chat-completions",
            f"model={MODEL},base_url={f32.url}/v1/chat/completions,num_concurrent=4,max_retries=1",
        )
    finally:
        assert stop_server(f32) == 0
    assert in_process > 0.5  # the task is one SmolLM2 does, so the metric says something
    assert served == pytest.approx(in_process, abs=0.01)
    assert got == expected  # every answer, not only the metric
