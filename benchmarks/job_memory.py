"""A fine-tuning job's estimated peak memory (what a Ray cluster reserves for its worker) against
the peak resident memory of a real run.

    nice -n 19 python benchmarks/job_memory.py [--examples 8] [--shapes 4x256 2x1024] [--methods full lora]

SmolLM2-135M-Instruct from the bench home, a full fine-tune and a LoRA job (r 16, every linear
layer, dropout 0.05), one epoch of ``--examples`` chat examples whose assistant turns fill the
sequence length (so batches are as wide as the estimate assumes), for each ``--shapes`` entry
(``BATCHxLENGTH``: batch size and ``max_seq_length``), each run in its own process: the job trainer
(``run_sft``) with its epoch checkpoint, as a worker runs it. Reports each process's peak RSS after
its imports (the runtime a worker holds before it trains) and at the end, beside
``fine_tuning_memory``'s estimate. Check the estimate before a long shape: a run needs about that
much memory. Writes a new benchmarks/results/job_memory-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import MODEL, ROOT, print_child_result, registered_model, run_child, write_result

METHODS = ("full", "lora")
STORY = (
    "The lighthouse keeper counted the ships that passed each night and wrote their names in a book "
    "that nobody else would ever read, because the harbour had long since closed and the town moved "
    "inland. "
)
TOKENS_PER_STORY = 20
"""Fewer than the story's tokens (about 40): repeated ``length // TOKENS_PER_STORY`` times, an
assistant turn is longer than ``length`` tokens, so every row is cut to the full length."""


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def shape(text: str) -> tuple[int, int]:
    """``BATCHxLENGTH`` as (batch size, max_seq_length)."""
    batch, _, length = text.partition("x")
    try:
        return int(batch), int(length)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BATCHxLENGTH, e.g. 4x256") from None


def write_chat_file(path: Path, count: int, length: int) -> None:
    with path.open("w") as out:
        for i in range(count):
            messages = [
                {"role": "user", "content": f"Tell story number {i} about the lighthouse."},
                {"role": "assistant", "content": STORY * (length // TOKENS_PER_STORY)},
            ]
            out.write(json.dumps({"messages": messages}) + "\n")


def spec_for(method: str, batch_size: int, length: int) -> Any:
    from llmos.training.spec import TrainingSpec

    return TrainingSpec(n_epochs=1, batch_size=batch_size, adapter=method, lora_r=16, max_seq_length=length)


def one_run(method: str, base_dir: Path, data: Path, batch_size: int, length: int) -> dict[str, Any]:
    """Train in this process; its peak resident memory after the imports and at the end."""
    import peft  # noqa: F401 -- imported by the trainer; counted in the runtime as a worker has it
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from llmos.kernel.devices import detect_cpu
    from llmos.training.run import Hooks, TrainingRun
    from llmos.training.sft import run_sft

    runtime = _peak_mb()
    hooks = Hooks(metrics=lambda m: None, message=print, checkpoint=lambda *a: None, control=lambda: None)
    spec = spec_for(method, batch_size, length)
    with tempfile.TemporaryDirectory() as work:
        result = run_sft(TrainingRun(base_dir, data, None, spec, 0, Path(work), hooks, detect_cpu().bf16_fast))
    return {"runtime_rss_mb": runtime, "peak_rss_mb": _peak_mb(), "trained_tokens": result.trained_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--shapes", nargs="+", type=shape, default=[(4, 256)], metavar="BATCHxLENGTH")
    parser.add_argument("--home", type=Path, default=ROOT / ".cache" / "bench-home")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # one run, in a child process
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    from llmos.config import Settings
    from llmos.training.finetune_memory import fine_tuning_memory

    record, base_dir = registered_model(Settings(home=args.home), MODEL)
    if args.method:
        (batch_size, length) = args.shapes[0]
        print_child_result(one_run(args.method, base_dir, args.data, batch_size, length))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch_size, length in args.shapes:
            data = Path(tmp) / f"train-{length}.jsonl"
            write_chat_file(data, args.examples, length)
            for method in args.methods:
                spec = spec_for(method, batch_size, length)
                estimate = fine_tuning_memory(
                    base_dir, record.parameter_count, spec, "chat", data_bytes=data.stat().st_size
                )
                assert estimate is not None, "the bench model's shapes are readable"
                child = ["--method", method, "--data", str(data), "--home", str(args.home)]
                measured = run_child(__file__, [*child, "--shapes", f"{batch_size}x{length}"])
                row = {"method": method, "batch_size": batch_size, "max_seq_length": length}
                row |= {"estimate_mb": round(estimate / 2**20), **measured}
                row["estimate_over_peak"] = round(row["estimate_mb"] / measured["peak_rss_mb"], 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"model": MODEL, "parameter_count": record.parameter_count, "examples": args.examples, "rows": rows}
    write_result("job_memory", result)


if __name__ == "__main__":
    main()
