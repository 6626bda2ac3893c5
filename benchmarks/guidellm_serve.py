"""Serving measured from outside: guidellm, the load generator issue 27 measured LLM OS with.

    python benchmarks/guidellm_serve.py                        # 1, 16 and 64 clients
    python benchmarks/guidellm_serve.py --clients 16 64 --env LLMOS_STEP_TOKEN_BUDGET=512

What issue 27's table was: ``/v1/completions`` streamed, synthetic prompts of 128 tokens (made
by guidellm from the model's tokenizer), 64 output tokens, a fixed number of concurrent clients
(guidellm's ``concurrent`` profile), SmolLM2-135M-Instruct on ``llmos serve`` with its defaults.
Each concurrency runs ``--requests-per-client`` requests per client after the server has loaded
the model. The table has output tokens/s, time to first token p50/p95 and inter-token latency
p50, as guidellm computes them, and the serving process's peak resident memory.

guidellm 0.8.1 pins click 8.4 and multidict 6, older than this project's, so it is not one of
its dependencies: it runs from a virtual environment of its own laid over the project's (its
torch and transformers are reused), made once by

    .venv/bin/python -m venv .cache/guidellm-venv
    echo "$PWD/.venv/lib/python3.11/site-packages" > .cache/guidellm-venv/lib/python3.11/site-packages/llmos.pth
    .cache/guidellm-venv/bin/pip install guidellm==0.8.1

Writes benchmarks/results/guidellm_serve-<date>-<commit>.json with the table's figures, and
guidellm's own reports beside it as ``*.guidellm.json`` (ignored by git: megabytes of per-request
timings).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import KEY, MODEL, ROOT, PeakRss, start_server, write_result

GUIDELLM = ROOT / ".cache" / "guidellm-venv" / "bin" / "guidellm"


def guidellm_run(guidellm: Path, url: str, tokenizer: Path, clients: int, requests: int, out: Path) -> dict[str, Any]:
    """One guidellm benchmark at ``clients`` concurrent streams; its JSON report."""
    command = [
        str(guidellm),
        "run",
        "--backend",
        f"kind=openai_http,target={url},model={MODEL},api_key={KEY},request_format=/v1/completions,stream=true",
        "--profile",
        f"kind=concurrent,streams={clients}",
        "--constraint",
        f"kind=max_requests,count={requests}",
        "--data",
        "kind=synthetic_text,prompt_tokens=128,output_tokens=64",
        "--tokenizer",
        f"kind=hf_auto,model={tokenizer}",
        "--output",
        f"kind=json,path={out}",
        "--disable-console-interactive",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run(command, check=True, env=env)
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def _successful(metric: dict[str, Any]) -> dict[str, Any]:
    successful: dict[str, Any] = metric.get("successful", metric)
    return successful


def figures(report: dict[str, Any]) -> dict[str, float]:
    """The table's figures from guidellm's report (its one benchmark)."""
    metrics = report["benchmarks"][0]["metrics"]
    ttft = _successful(metrics["time_to_first_token_ms"])["percentiles"]
    itl = _successful(metrics["inter_token_latency_ms"])["percentiles"]
    totals = report["benchmarks"][0]["metrics"].get("request_totals", {})
    return {
        "output_tokens_per_s": _successful(metrics["output_tokens_per_second"])["mean"],
        "ttft_p50_s": ttft["p50"] / 1000,
        "ttft_p95_s": ttft["p95"] / 1000,
        "itl_p50_ms": itl["p50"],
        # The tail of the gaps between tokens: where running streams wait for a prefill pass.
        "itl_p95_ms": itl["p95"],
        "itl_p99_ms": itl["p99"],
        "requests": totals,
        "errors": [str(_first_error(r))[:300] for r in report["benchmarks"][0].get("requests", {}).get("errored", [])],
    }


def _first_error(node: Any) -> Any:
    """The first ``error`` field in an errored request's record (guidellm nests it)."""
    if isinstance(node, dict):
        if node.get("error"):
            return node["error"]
        found = (_first_error(v) for v in node.values())
    elif isinstance(node, list):
        found = (_first_error(v) for v in node)
    else:
        return None
    return next((f for f in found if f), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--env", nargs="*", default=[], help="settings of the server, NAME=VALUE")
    parser.add_argument("--guidellm", type=Path, default=GUIDELLM)
    parser.add_argument("--home", type=Path, default=ROOT / ".cache" / "bench-home")
    parser.add_argument("--out", type=Path, default=None, help="result file (default: a new dated one; never replaced)")
    args = parser.parse_args()
    if not args.guidellm.exists():
        raise SystemExit(f"no guidellm at {args.guidellm}: make its environment first (see this file's docstring)")

    from llmos.config import Settings
    from llmos.platform import Platform

    platform = Platform.open(Settings(home=args.home))
    if not platform.registry.list():
        raise SystemExit(f"no model in {args.home}: run benchmarks/serve.py once, or `llmos pull {MODEL}` there")
    tokenizer = platform.registry.model_dir(platform.registry.get(MODEL))
    platform.close()

    env = dict(item.split("=", 1) for item in args.env)
    proc, url = start_server(args.home, env)
    rows: dict[str, dict[str, Any]] = {}
    reports: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            guidellm_run(args.guidellm, url, tokenizer, 1, 2, Path(scratch) / "warm.json")  # the model loads
            for clients in args.clients:
                with PeakRss(proc.pid) as rss:
                    report = guidellm_run(
                        args.guidellm,
                        url,
                        tokenizer,
                        clients,
                        clients * args.requests_per_client,
                        Path(scratch) / f"c{clients}.json",
                    )
                key = f"llmos, {clients} client(s)"
                rows[key] = {**figures(report), "peak_rss_mb": rss.peak / 2**20}
                reports[key] = report
                print(f"  {key}: {json.dumps({k: v for k, v in rows[key].items() if k != 'requests'})}")
                if rows[key]["errors"]:
                    print(f"  errored: {rows[key]['errors']}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    print(f"{'row':<26} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>8} {'ITL p99':>8} {'RSS':>8}")
    for key, row in rows.items():
        print(
            f"{key:<26} {row['output_tokens_per_s']:>7.1f} {row['ttft_p50_s']:>8.2f}s {row['ttft_p95_s']:>8.2f}s "
            f"{row['itl_p50_ms']:>6.0f}ms {row['itl_p99_ms']:>6.0f}ms {row['peak_rss_mb']:>6.0f}MB"
        )
    # guidellm's own reports (every request's timings, megabytes) go beside it, not into the repository.
    path = write_result("guidellm_serve", {"settings": env, "rows": rows}, args.out)
    path.with_suffix(".guidellm.json").write_text(json.dumps(reports))


if __name__ == "__main__":
    main()
