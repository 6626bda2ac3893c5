"""A fine-tuning job's estimated peak memory (what a Ray cluster reserves for its worker) against
the peak resident memory of a real run.

    nice -n 19 python benchmarks/job_memory.py [--examples 16] [--batch-size 4] [--max-seq-length 256]

SmolLM2-135M-Instruct from the bench home, a full fine-tune and a LoRA job (r 16, every linear
layer), one epoch of chat examples whose assistant turns fill ``--max-seq-length`` (so batches are
as wide as the estimate assumes), each in its own process: the job trainer (``run_sft``) with its
epoch checkpoint, as a worker runs it. Reports each process's peak RSS after its imports (the
runtime a worker holds before it trains) and at the end, beside ``fine_tuning_memory``'s estimate.
Writes a new benchmarks/results/job_memory-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import MODEL, ROOT, write_result

METHODS = ("full", "lora")
STORY = (
    "The lighthouse keeper counted the ships that passed each night and wrote their names in a book "
    "that nobody else would ever read, because the harbour had long since closed and the town moved "
    "inland. "
)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_chat_file(path: Path, count: int) -> None:
    with path.open("w") as out:
        for i in range(count):
            messages = [
                {"role": "user", "content": f"Tell story number {i} about the lighthouse."},
                {"role": "assistant", "content": STORY * 12},
            ]
            out.write(json.dumps({"messages": messages}) + "\n")


def spec_for(method: str, args: argparse.Namespace) -> Any:
    from llmos.training.spec import TrainingSpec

    return TrainingSpec(
        n_epochs=1, batch_size=args.batch_size, adapter=method, lora_r=16, max_seq_length=args.max_seq_length
    )


def one_run(method: str, base_dir: Path, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train in this process; its peak resident memory after the imports and at the end."""
    import peft  # noqa: F401 -- imported by the trainer; counted in the runtime as a worker has it
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from llmos.kernel.devices import detect_cpu
    from llmos.training.run import Hooks, TrainingRun
    from llmos.training.sft import run_sft

    runtime = _peak_mb()
    hooks = Hooks(metrics=lambda m: None, message=print, checkpoint=lambda *a: None, control=lambda: None)
    with tempfile.TemporaryDirectory() as work:
        result = run_sft(
            TrainingRun(base_dir, data, None, spec_for(method, args), 0, Path(work), hooks, detect_cpu().bf16_fast)
        )
    return {"runtime_rss_mb": runtime, "peak_rss_mb": _peak_mb(), "trained_tokens": result.trained_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--home", type=Path, default=ROOT / ".cache" / "bench-home")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # one run, in a child process
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    from llmos.config import Settings
    from llmos.platform import Platform
    from llmos.training.finetune_memory import fine_tuning_memory

    platform = Platform.open(Settings(home=args.home))
    record = platform.registry.get(MODEL)
    base_dir = platform.registry.model_dir(record)
    platform.close()
    if args.method:
        print("RESULT " + json.dumps(one_run(args.method, base_dir, args.data, args)), flush=True)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        write_chat_file(data, args.examples)
        for method in args.methods:
            estimate = fine_tuning_memory(
                base_dir, record.parameter_count, spec_for(method, args), "chat", data_bytes=data.stat().st_size
            )
            assert estimate is not None, "the bench model's shapes are readable"
            command = [sys.executable, __file__, "--method", method, "--data", str(data), "--home", str(args.home)]
            command += ["--batch-size", str(args.batch_size), "--max-seq-length", str(args.max_seq_length)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            measured = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
            row = {"method": method, "estimate_mb": round(estimate / 2**20), **measured}
            row["estimate_over_peak"] = round(row["estimate_mb"] / measured["peak_rss_mb"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "model": MODEL,
        "parameter_count": record.parameter_count,
        "examples": args.examples,
        "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length,
        "rows": rows,
    }
    print(f"wrote {write_result('job_memory', result)}")


if __name__ == "__main__":
    main()
