"""Pre-training on tiny Shakespeare through the platform's own job path: the corpus uploaded as
``pretrain`` files (the first 90% of ``../shared/datasets/tinyshakespeare/input.txt`` to train,
the last 10% to validate, as nanoGPT splits it), a ``pretrain`` job queued and run by the job
supervisor's worker process (BPE tokenizer, Llama model, the one training loop), the result
registered. Prints and writes each validation's loss per character (nats) with the seconds of
training behind it, the best within ``--budget-minutes``, the samples, and the recipe.

    python benchmarks/pretrain_shakespeare.py   # the run in docs/performance.md (5.4M parameters, 13 epochs)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import write_result
from llmos.config import Settings
from llmos.kernel.supervisor import JobSupervisor
from llmos.platform import Platform

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "tinyshakespeare" / "input.txt"
TARGET_NATS_PER_CHAR = 1.70


def recipe(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "type": "pretrain",
        "pretrain": {
            "hyperparameters": {
                "n_epochs": args.epochs,
                "batch_size": args.batch_size,
                "learning_rate_multiplier": args.lr_multiplier,
            },
            "architecture": {
                "hidden_size": args.hidden_size,
                "num_hidden_layers": args.layers,
                "num_attention_heads": args.heads,
                "num_key_value_heads": args.heads,
                "intermediate_size": args.intermediate_size,
            },
            "tokenizer": {"type": "bpe", "vocab_size": args.vocab_size},
            "max_seq_length": args.context,
            "warmup_ratio": 0.05,
            "lr_scheduler": "cosine",
            "weight_decay": 0.1,
            "samples": {"prompts": ["ROMEO:\n"], "max_tokens": 96},
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=13)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr-multiplier", type=float, default=2.0, help="times the base 1e-3")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate-size", type=int, default=768)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--context", type=int, default=128, help="tokens a window")
    parser.add_argument("--budget-minutes", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--threads", type=int, default=0, help="the worker's torch threads (0: every core)")
    args = parser.parse_args()

    text = DATA.read_text(encoding="utf-8")
    cut = len(text) * 9 // 10
    home = Path(tempfile.mkdtemp(prefix="pretrain-shakespeare-"))
    settings = Settings(
        home=home, admin_key="benchmark-admin-key-0123456789", max_concurrent_jobs=1, training_threads=args.threads
    )
    platform = Platform.open(settings)

    def upload(name: str, part: str) -> str:
        record, _ = platform.files.create(
            tenant="default", purpose="pretrain", filename=name, chunks=[part.encode()], max_bytes=1 << 30
        )
        return record.id

    body = {
        "model": "llama",
        "training_file": upload("train.txt", text[:cut]),
        "validation_file": upload("valid.txt", text[cut:]),
        "method": recipe(args),
        "seed": args.seed,
        "suffix": "shakespeare",
    }
    job = platform.jobs.create(tenant="default", body=body)
    supervisor = JobSupervisor(platform.jobs, platform.training_quota, settings)
    start = time.perf_counter()
    while platform.jobs.get("default", job.id).status.value not in ("succeeded", "failed", "cancelled"):
        supervisor.tick()
        time.sleep(1.0)
    wall = time.perf_counter() - start
    supervisor.stop()
    done = platform.jobs.get("default", job.id)
    events = list(reversed(platform.jobs.events("default", job.id, limit=1000)[0]))
    started = next(e["created_at"] for e in events if e["message"].startswith("Training "))
    validations = [
        {
            "seconds": e["created_at"] - started,
            **{k: v for k, v in e["data"].items() if k.startswith("valid_") or k in ("step", "epoch")},
        }
        for e in events
        if e["type"] == "metrics" and "valid_loss_per_char" in (e["data"] or {})
    ]
    in_budget = [v for v in validations if v["seconds"] <= args.budget_minutes * 60]
    best = min((v["valid_loss_per_char"] for v in in_budget), default=None)
    row = {
        "status": done.status.value,
        "error": done.error,
        "model": done.fine_tuned_model,
        "validations": validations,
        "best_valid_loss_per_char_within_budget": best,
        "target": TARGET_NATS_PER_CHAR,
        "reached": best is not None and best <= TARGET_NATS_PER_CHAR,
        "training_seconds": validations[-1]["seconds"] if validations else None,
        "wall_seconds": round(wall, 1),
        "samples": [e["message"] for e in events if e["message"].startswith("Sample: ")][-2:],
        "messages": [e["message"] for e in events if e["type"] == "message" and not e["message"].startswith("Sample")],
        "recipe": recipe(args),
        "seed": args.seed,
        "threads": args.threads,
        "when": datetime.now().isoformat(timespec="seconds"),
    }
    for v in validations:
        print(f"{v['seconds']:7.0f} s  epoch {v['epoch']}  {v['valid_loss_per_char']:.3f} nats/char  "
              f"{v['valid_loss']:.3f} nats/token  {v['valid_bits_per_byte']:.3f} bits/byte")  # fmt: skip
    print(
        json.dumps({k: row[k] for k in ("status", "best_valid_loss_per_char_within_budget", "reached", "wall_seconds")})
    )
    print(row["samples"][-1] if row["samples"] else "")
    write_result("pretrain_shakespeare", row)
    platform.close()


if __name__ == "__main__":
    main()
