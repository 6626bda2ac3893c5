"""lm-evaluation-harness through the server (``local-completions``) scores what the same weights
score in-process (``--model hf``): a multiple-choice task from ../shared/datasets, task file in
tests/lm_eval_tasks."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from llmos.platform import Platform
from tests.conftest import ADMIN_KEY
from tests.tiny_models import build_tiny_chat_model
from tests.unit.test_http_server import running_server

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is a dev extra")

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "tests" / "lm_eval_tasks"
LIMIT = 40


def evaluate(model: str, model_args: str) -> tuple[float, dict[int, list[float]]]:
    """The task's accuracy and each document's log-likelihood of every choice."""
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["llmos_sst2_mc"],
        task_manager=TaskManager(include_path=str(TASKS)),
        limit=LIMIT,
        batch_size=1,
        log_samples=True,
    )
    assert results is not None
    samples = results["samples"]["llmos_sst2_mc"]
    choices = {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in samples}
    return float(results["results"]["llmos_sst2_mc"]["acc,none"]), choices


@pytest.mark.slow
def test_local_completions_scores_a_multiple_choice_task_as_the_weights_do(
    platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not (ROOT.parent / "shared" / "datasets" / "sst2" / "dev.tsv").is_file():
        pytest.skip("../shared/datasets/sst2 is not here")
    monkeypatch.chdir(ROOT)  # the task file names its data relative to the repository root
    monkeypatch.setenv("OPENAI_API_KEY", ADMIN_KEY)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    weights = build_tiny_chat_model(tmp_path / "tiny", seed=1, context=1024)
    platform.registry.pull(f"file:{weights}", name="tiny-eval")
    in_process, expected = evaluate("hf", f"pretrained={weights},dtype=float32,device=cpu")
    with running_server(platform, http_body_timeout_s=30, http_keep_alive_s=5) as settings:
        base = f"http://{settings.host}:{settings.port}"
        warm = {"model": "tiny-eval", "prompt": "Hello", "max_tokens": 1}  # loaded before the harness's crowd
        assert httpx.post(
            f"{base}/v1/completions", json=warm, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ).is_success
        served, got = evaluate(
            "local-completions",
            f"model=tiny-eval,base_url={base}/v1/completions,"
            f"tokenizer={weights},tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=4,max_retries=1",
        )
    assert served == pytest.approx(in_process, abs=0.01)
    assert len(got) == LIMIT and got.keys() == expected.keys()
    for doc, lls in expected.items():  # every choice's log-likelihood, not only the accuracy
        assert got[doc] == pytest.approx(lls, abs=1e-3)
