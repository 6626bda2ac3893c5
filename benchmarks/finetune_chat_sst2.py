"""SmolLM2-135M-Instruct + LoRA on SST-2 framed as chat, with LLM OS's chat trainer (the code jobs run).

    python benchmarks/finetune_chat_sst2.py [--train 1000] [--epochs 1] [--threads 2]

The first ``--train`` sentences of SST-2 train become chat examples (the review in the user
turn, "positive" or "negative" as the assistant's answer); LoRA r 16 on every linear layer.
Accuracy is measured on the full test split (1,821 sentences) the way the fine-tuning issue's
reference did: compare the next-token logits of "positive" and "negative" after the chat
template's generation prompt, for the base model (zero-shot) and for the fine-tuned adapter.
Prints a table and writes a new benchmarks/results/finetune_quality-sst2-smollm2-lora-<date>-<commit>.json.
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
from benchmarks.finetune_quality import ROOT, SHARED
from benchmarks.harness import write_result

MODEL = "smollm2-135m-instruct"
TASK = "sst2-smollm2-lora"
PROMPT = "Is the sentiment of this movie review positive or negative? Answer with one word.\n\nReview: {text}"
LABELS = ("negative", "positive")  # SST-2's 0 and 1
REFERENCE = {"accuracy": 0.877, "zero_shot": 0.72, "note": "plain PEFT script, 800 sentences, 10 min, 94 tokens/s"}


def sentences(path: Path) -> list[tuple[str, int]]:
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [(text, int(label)) for text, label in (line.rsplit("\t", 1) for line in lines if line.strip())]


def accuracy(model: Any, tokenizer: Any, data: list[tuple[str, int]], batch: int = 32) -> float:
    """Share of sentences whose label word gets the higher next-token logit after the prompt."""
    import torch

    word_ids = [tokenizer.encode(word, add_special_tokens=False)[0] for word in LABELS]
    tokenizer.padding_side = "left"
    correct = 0
    with torch.inference_mode():
        for k in range(0, len(data), batch):
            chunk = data[k : k + batch]
            texts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": PROMPT.format(text=t)}], add_generation_prompt=True, tokenize=False
                )
                for t, _ in chunk
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            logits = model(**enc).logits[:, -1, word_ids]
            correct += sum(int(p == y) for p, (_, y) in zip(logits.argmax(-1).tolist(), chunk, strict=True))
    return correct / len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr-multiplier", type=float, default=1.0)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--home", type=Path, default=ROOT / ".cache" / "bench-home")
    args = parser.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmos.config import Settings
    from llmos.kernel.devices import detect_cpu
    from llmos.platform import Platform
    from llmos.training.run import Hooks, TrainingRun
    from llmos.training.sft import run_sft
    from llmos.training.spec import TrainingSpec

    if args.threads:
        torch.set_num_threads(args.threads)
    platform = Platform.open(Settings(home=args.home))
    base_dir = platform.registry.model_dir(platform.registry.get(MODEL))
    platform.close()
    train = sentences(SHARED / "sst2" / "train.tsv")[: args.train]
    test = sentences(SHARED / "sst2" / "test.tsv")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).eval()
    start = time.perf_counter()
    zero_shot = accuracy(base, tokenizer, test)
    eval_s = time.perf_counter() - start
    print(f"zero-shot accuracy {zero_shot:.3f} ({eval_s:.0f} s for {len(test)} sentences)")

    spec = TrainingSpec(
        n_epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate_multiplier=args.lr_multiplier,
        adapter="lora",
        lora_r=16,
        lora_alpha=32,
        max_seq_length=256,
        warmup_ratio=0.06,
        lr_scheduler="linear",
    )
    hooks = Hooks(metrics=print, message=print, checkpoint=lambda *a: None, control=lambda: None)
    with tempfile.TemporaryDirectory() as work:
        train_file = Path(work) / "train.jsonl"
        with train_file.open("w") as out:
            for text, label in train:
                messages = [
                    {"role": "user", "content": PROMPT.format(text=text)},
                    {"role": "assistant", "content": LABELS[label]},
                ]
                out.write(json.dumps({"messages": messages}) + "\n")
        start = time.perf_counter()
        run = TrainingRun(base_dir, train_file, None, spec, 0, Path(work) / "job", hooks, detect_cpu().bf16_fast)
        result = run_sft(run)
        train_s = time.perf_counter() - start
        tuned = PeftModel.from_pretrained(base, result.model_dir).merge_and_unload().eval()
        fine_tuned = accuracy(tuned, tokenizer, test)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {
        "task": TASK,
        "test_accuracy": fine_tuned,
        "zero_shot_accuracy": zero_shot,
        "train_sentences": len(train),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": spec.learning_rate,
        "train_seconds": train_s,
        "train_tokens_per_s": result.trained_tokens / train_s,
        "peak_rss_mb": peak_mb,
        "reference": REFERENCE,
        "date": time.strftime("%Y-%m-%d"),
    }
    header = f"{'task':18} {'zero-shot':>9} {'LoRA acc':>9} {'ref acc':>8} {'train s':>8} {'tok/s':>7} {'peak MB':>8}"
    print("\n" + header)
    print(
        f"{TASK:18} {zero_shot:9.3f} {fine_tuned:9.3f} {REFERENCE['accuracy']:8.3f} {train_s:8.0f} "
        f"{row['train_tokens_per_s']:7.0f} {peak_mb:8.0f}"
    )
    write_result(f"finetune_quality-{TASK}", row)


if __name__ == "__main__":
    main()
