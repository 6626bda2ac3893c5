"""lm-evaluation-harness on the same weights in-process (``--model hf``, batch size 1) and through
a running server (``local-completions``, ``num_concurrent`` 4): accuracy and wall time of each.

    python benchmarks/lm_eval_served.py [--model-dir DIR] [--limit 100]

The task is tests/lm_eval_tasks/llmos_sst2_mc.yaml (SST-2's dev split from ../shared/datasets as a
two-way multiple choice). Without ``--model-dir`` the tests' tiny random Llama is built and used
(its accuracy is chance: the run shows that both ways agree and what each costs). Served in
float32, as ``--model hf`` loads it. Writes benchmarks/results/lm_eval_served-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import ROOT, write_result

KEY = "bench-admin-key-0123456789"


def evaluate(model: str, model_args: str, limit: int) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    start = time.monotonic()
    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["llmos_sst2_mc"],
        task_manager=TaskManager(include_path=str(ROOT / "tests" / "lm_eval_tasks")),
        limit=limit,
        batch_size=1,
    )
    assert results is not None
    return {"acc": results["results"]["llmos_sst2_mc"]["acc,none"], "wall_s": round(time.monotonic() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="a causal model's directory (default: the tests' tiny Llama)")
    parser.add_argument("--limit", type=int, default=100, help="reviews of the dev split to score")
    args = parser.parse_args()
    os.chdir(ROOT)  # the task file names its data relative to the repository root
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ["OPENAI_API_KEY"] = KEY

    import httpx
    from tests.tiny_models import build_tiny_chat_model
    from tests.unit.test_http_server import running_server

    from llmos.config import Settings
    from llmos.platform import Platform

    tmp = Path(tempfile.mkdtemp(prefix="lm-eval-bench-"))
    weights = args.model_dir or build_tiny_chat_model(tmp / "tiny", seed=1, context=1024)
    settings = Settings(home=tmp / "home", admin_key=KEY, dtype="float32", allowed_hosts=["testserver"])
    platform = Platform.open(settings)
    try:
        platform.registry.pull(f"file:{weights}", name="eval-model")
        in_process = evaluate("hf", f"pretrained={weights},dtype=float32,device=cpu", args.limit)
        with running_server(platform, http_body_timeout_s=30, http_keep_alive_s=5) as running:
            base = f"http://{running.host}:{running.port}"
            warm = {"model": "eval-model", "prompt": "Hello", "max_tokens": 1}  # loaded before timing
            httpx.post(f"{base}/v1/completions", json=warm, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
            served = evaluate(
                "local-completions",
                f"model=eval-model,base_url={base}/v1/completions,tokenizer={weights},tokenizer_backend=huggingface,"
                "tokenized_requests=True,num_concurrent=4,max_retries=1",
                args.limit,
            )
    finally:
        platform.close()
    result = {
        "task": "llmos_sst2_mc",
        "limit": args.limit,
        "model": str(args.model_dir or "tiny random Llama (tests/tiny_models.py, seed 1)"),
        "hf_batch_1": in_process,
        "local_completions_concurrent_4": served,
    }
    print(result)
    write_result("lm_eval_served", result)


if __name__ == "__main__":
    main()
