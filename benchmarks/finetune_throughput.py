"""LoRA training throughput: LLM OS's chat trainer against a plain PEFT + transformers Trainer loop.

    python benchmarks/finetune_throughput.py [--train 256] [--batch-size 8]

Same model (SmolLM2-135M-Instruct), same examples (the first ``--train`` SST-2 sentences framed
as chat, as in benchmarks/finetune_chat_sst2.py), LoRA r 16 on every linear layer, one epoch,
batch 8, sequences up to 256 tokens, in the same run, each system in its own process (for its
peak memory):
- ``peft-trainer``: what a user writes: ``get_peft_model`` + ``transformers.Trainer`` with
  ``bf16=True`` (autocast on CPU), padding each batch to its longest example;
- ``llmos``: the job trainer (``run_sft``); ``llmos-grouped`` with ``group_by_length``,
  ``llmos-packing`` with sequence packing.
Training tokens/s counts real tokens only (no padding), the same way for every system. Prints
a table and writes a new benchmarks/results/finetune_throughput-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.finetune_chat_sst2 import LABELS, MODEL, PROMPT, sentences
from benchmarks.finetune_quality import ROOT, SHARED
from benchmarks.harness import print_child_result, registered_model, run_child, write_result

SYSTEMS = ("peft-trainer", "llmos", "llmos-grouped", "llmos-packing")


def write_chat_file(path: Path, count: int) -> None:
    with path.open("w") as out:
        for text, label in sentences(SHARED / "sst2" / "train.tsv")[:count]:
            messages = [
                {"role": "user", "content": PROMPT.format(text=text)},
                {"role": "assistant", "content": LABELS[label]},
            ]
            out.write(json.dumps({"messages": messages}) + "\n")


def run_peft_trainer(base_dir: Path, data: Path, work: Path, batch_size: int) -> tuple[float, int]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from llmos.training.chat_data import load_chat_file

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    examples = load_chat_file(data, tokenizer, 256)  # the same tokens and labels as the job trainer
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    args = TrainingArguments(
        output_dir=str(work),
        per_device_train_batch_size=batch_size,
        num_train_epochs=1,
        learning_rate=2e-4,
        bf16=True,
        use_cpu=True,
        save_strategy="no",
        report_to=[],
        logging_steps=10,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, sum(len(e.input_ids) for e in examples)


def run_llmos(
    base_dir: Path, data: Path, work: Path, batch_size: int, *, packing: bool, grouped: bool
) -> tuple[float, int]:
    from llmos.kernel.devices import detect_cpu
    from llmos.training.run import Hooks, TrainingRun
    from llmos.training.sft import run_sft
    from llmos.training.spec import TrainingSpec

    spec = TrainingSpec(
        n_epochs=1,
        batch_size=batch_size,
        adapter="lora",
        lora_r=16,
        lora_alpha=32,
        max_seq_length=256,
        packing=packing,
        group_by_length=grouped,
    )
    hooks = Hooks(metrics=lambda m: None, message=print, checkpoint=lambda *a: None, control=lambda: None)
    start = time.perf_counter()
    result = run_sft(TrainingRun(base_dir, data, None, spec, 0, work, hooks, detect_cpu().bf16_fast))
    return time.perf_counter() - start, result.trained_tokens


def one_system(system: str, base_dir: Path, data: Path, batch_size: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as work:
        if system == "peft-trainer":
            seconds, tokens = run_peft_trainer(base_dir, data, Path(work), batch_size)
        else:
            packing, grouped = system == "llmos-packing", system == "llmos-grouped"
            seconds, tokens = run_llmos(base_dir, data, Path(work), batch_size, packing=packing, grouped=grouped)
    return {
        "system": system,
        "train_seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--home", type=Path, default=ROOT / ".cache" / "bench-home")
    parser.add_argument("--system", choices=SYSTEMS, help=argparse.SUPPRESS)  # one system, in a child process
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    args = parser.parse_args()

    from llmos.config import Settings

    _, base_dir = registered_model(Settings(home=args.home), MODEL)
    if args.system:
        print_child_result(one_system(args.system, base_dir, args.data, args.batch_size))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        write_chat_file(data, args.train)
        for system in args.systems:
            child = ["--system", system, "--data", str(data), "--home", str(args.home)]
            rows.append(run_child(__file__, [*child, "--batch-size", str(args.batch_size)]))
            print(f"{system}: {rows[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    baseline = rows[0]["tokens_per_s"]
    print(f"\n{'system':16} {'train s':>8} {'tokens':>8} {'tok/s':>7} {'x PEFT+Trainer':>14} {'peak MB':>8}")
    for row in rows:
        row["ratio"] = row["tokens_per_s"] / baseline
        print(
            f"{row['system']:16} {row['train_seconds']:8.1f} {row['tokens']:8d} {row['tokens_per_s']:7.0f} "
            f"{row['ratio']:14.2f} {row['peak_rss_mb']:8.0f}"
        )
    meta = {"model": MODEL, "train_sentences": args.train, "batch_size": args.batch_size, "lora_r": 16}
    write_result("finetune_throughput", {**meta, "rows": rows})


if __name__ == "__main__":
    main()
