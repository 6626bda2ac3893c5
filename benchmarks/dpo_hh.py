"""DPO (LoRA) on Anthropic HH-RLHF harmless pairs with SmolLM2-135M-Instruct, through the trainer
fine-tuning jobs run (``training/dpo.py`` in the shared loop). The first ``--train`` pairs of
``../shared/datasets/pref_hh_rlhf_harmless_test`` train; the next ``--held-out`` pairs are scored
before and after: how often the model gives the preferred answer the higher summed log-probability,
and (after) DPO's own preference accuracy and reward margin against the base model.

    python benchmarks/dpo_hh.py --model-dir DIR --train 32 --held-out 32 --lr-multiplier 2.5
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import write_result
from llmos.kernel.devices import detect_cpu
from llmos.training.dpo import DPOTask, Pair, completion_logps, load_pairs
from llmos.training.loop import fit
from llmos.training.run import Hooks, TrainingRun
from llmos.training.sft import load_causal_model
from llmos.training.spec import parse_spec

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "pref_hh_rlhf_harmless_test" / "test.jsonl"


def openai_lines(rows: list[dict[str, Any]]) -> str:
    """HH pairs (prompt messages, chosen, rejected) as OpenAI's preference lines."""
    return "\n".join(
        json.dumps(
            {
                "input": {"messages": r["prompt"]},
                "preferred_output": [{"role": "assistant", "content": r["chosen"]}],
                "non_preferred_output": [{"role": "assistant", "content": r["rejected"]}],
            }
        )
        for r in rows
    )


@torch.no_grad()
def held_out_scores(task: DPOTask, pairs: list[Pair]) -> dict[str, float]:
    """In one pass over ``pairs`` (whose reference log-probabilities are the base model's): how
    often the model finds the preferred completion more likely, and DPO's preference accuracy
    and mean reward margin."""
    task.model.eval()
    likelier = ranked = 0
    margin = 0.0
    for k in range(0, len(pairs), 4):
        batch = pairs[k : k + 4]
        logps = completion_logps(
            task.model, [p.chosen for p in batch] + [p.rejected for p in batch], task.pad_id, task.run.bf16
        )
        chosen, rejected = logps[: len(batch)], logps[len(batch) :]
        likelier += int((chosen > rejected).sum())
        rewards = task.beta * (chosen - torch.tensor([p.reference_chosen for p in batch])) - task.beta * (
            rejected - torch.tensor([p.reference_rejected for p in batch])
        )
        ranked += int((rewards > 0).sum())
        margin += float(rewards.sum())
    return {
        "logp_accuracy_after": likelier / len(pairs),
        "dpo_preference_accuracy_after": ranked / len(pairs),
        "dpo_reward_margin_after": margin / len(pairs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True, help="SmolLM2-135M-Instruct (safetensors)")
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr-multiplier", type=float, default=1.0)
    parser.add_argument("--max-seq-length", type=int, default=192)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]
    work = Path(tempfile.mkdtemp(prefix="dpo-hh-"))
    (work / "train.jsonl").write_text(openai_lines(rows[: args.train]), encoding="utf-8")
    (work / "valid.jsonl").write_text(openai_lines(rows[args.train : args.train + args.held_out]), encoding="utf-8")
    method = {
        "type": "dpo",
        "dpo": {
            "hyperparameters": {
                "n_epochs": args.epochs,
                "batch_size": 4,
                "beta": args.beta,
                "learning_rate_multiplier": args.lr_multiplier,
            },
            "max_seq_length": args.max_seq_length,
        },
    }
    spec = parse_spec(method, None, training_records=args.train)
    hooks = Hooks(metrics=print, message=print, checkpoint=lambda *a: None, control=lambda: None)
    bf16 = detect_cpu().bf16_fast  # as the worker decides
    run = TrainingRun(args.model_dir, work / "train.jsonl", None, spec, 0, work / "run", hooks, bf16=bf16)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    train = load_pairs(run.train_path, tokenizer, spec.max_seq_length)
    valid = load_pairs(work / "valid.jsonl", tokenizer, spec.max_seq_length)
    # No validation inside the run: the held-out pairs are scored once, after it.
    task = DPOTask(run, load_causal_model(run, len(train)), tokenizer, train, [])
    held_out = task.with_reference(valid)
    before = sum(p.reference_chosen > p.reference_rejected for p in held_out) / len(held_out)
    trained = time.perf_counter()
    fit(task, run)
    trained = time.perf_counter() - trained
    row = {
        "train_pairs": len(train),
        "held_out_pairs": len(valid),
        "logp_accuracy_before": before,
        **held_out_scores(task, held_out),
        "training_seconds": round(trained, 1),
        "seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
        "bf16": bf16,
        "settings": vars(args) | {"model_dir": str(args.model_dir)},
    }
    print(json.dumps(row))
    write_result("dpo_hh", row)


if __name__ == "__main__":
    main()
