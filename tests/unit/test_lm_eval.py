"""lm-evaluation-harness through the server (``local-completions``) scores what the same weights
score in-process (``--model hf``): a multiple-choice task and a rolling-perplexity task from
../shared/datasets, task files in tests/lm_eval_tasks."""

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
TASK_NAMES = ("llmos_sst2_mc", "llmos_scitldr_ppl")
METRICS = [("llmos_sst2_mc", "acc"), ("llmos_scitldr_ppl", "word_perplexity"), ("llmos_scitldr_ppl", "bits_per_byte")]


def evaluate(model: str, model_args: str) -> tuple[dict[str, float], dict[str, dict[int, list[float]]]]:
    """Each task's metrics, and each document's log-likelihoods (of every choice; of the whole
    text for the rolling task)."""
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=list(TASK_NAMES),
        task_manager=TaskManager(include_path=str(TASKS)),
        limit=LIMIT,
        batch_size=1,
        log_samples=True,
    )
    assert results is not None
    metrics = {f"{task}:{name}": float(results["results"][task][f"{name},none"]) for task, name in METRICS}
    scores = {
        task: {
            s["doc_id"]: [float(r[0]) if isinstance(r, list | tuple) else float(r) for r in s["filtered_resps"]]
            for s in results["samples"][task]
        }
        for task in TASK_NAMES
    }
    return metrics, scores


@pytest.mark.slow
def test_local_completions_scores_a_multiple_choice_task_as_the_weights_do(
    platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not (ROOT.parent / "shared" / "datasets" / "sst2" / "dev.tsv").is_file():
        pytest.skip("../shared/datasets is not here")
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
            f"tokenizer={weights},tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=4,max_retries=1,"
            "max_length=1024",
        )
    for name, value in in_process.items():  # accuracy; word perplexity, bits per byte
        assert served[name] == pytest.approx(value, rel=0.01 if "perplexity" in name else 0, abs=0.01), name
    for task in TASK_NAMES:
        assert len(got[task]) == LIMIT and got[task].keys() == expected[task].keys()
        for doc, lls in expected[task].items():  # every log-likelihood, not only the metric
            assert got[task][doc] == pytest.approx(lls, abs=1e-3 * max(1, abs(lls[0]) / 100)), (task, doc)
