"""Fine-tuning quality and speed of LLM OS's trainers on real data (the same code jobs run).

    python benchmarks/finetune_quality.py [--task sst2-minilm] [--epochs 2] [--lr-multiplier 2.5]

sst2-minilm: all-MiniLM-L6-v2 fully fine-tuned on SST-2 train (6,920 sentences), evaluated on
the test split (1,821). Prints a table and writes benchmarks/results/finetune_quality.json
with accuracy, macro-F1, training tokens/s, wall time and peak memory. The reference figures
are the plain-script results quoted in the fine-tuning issue (same machine, same data).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
REFERENCE = {
    "sst2-minilm": {"accuracy": 0.868, "note": "plain script, constant LR, 2 epochs, 5.5 min"},
    "banking77-minilm": {"accuracy": 0.909, "note": "plain script, constant LR, 3 epochs, 14 min"},
}
DATA = {
    "sst2-minilm": ("sst2/train.tsv", "sst2/test.tsv"),
    "banking77-minilm": ("banking77/train.csv", "banking77/test.csv"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sst2-minilm", choices=sorted(REFERENCE))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr-multiplier", type=float, default=2.5)
    parser.add_argument("--home", type=Path, default=ROOT / ".cache" / "bench-home")
    args = parser.parse_args()

    from llmos.config import Settings
    from llmos.kernel.devices import detect_cpu
    from llmos.platform import Platform
    from llmos.training.classify import classification_report, load_classification_file
    from llmos.training.sft import Hooks
    from llmos.training.spec import TrainingSpec

    platform = Platform.open(Settings(home=args.home))
    try:
        base = platform.registry.get("all-minilm-l6-v2")
    except Exception:
        base = platform.registry.pull("all-minilm-l6-v2")
    spec = TrainingSpec(
        n_epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate_multiplier=args.lr_multiplier,
        adapter="full",
        max_seq_length=128,
        warmup_ratio=0.06,
        lr_scheduler="linear",
    )
    log: list[dict[str, Any]] = []
    hooks = Hooks(
        metrics=lambda m: (log.append(m), print({k: v for k, v in m.items() if k != "valid_report"})),
        message=print,
        checkpoint=lambda *a: None,
        control=lambda: None,
    )
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        from llmos.training.classify import run_classification

        result = run_classification(
            base_dir=platform.registry.model_dir(base),
            train_path=SHARED / DATA[args.task][0],
            valid_path=None,
            spec=spec,
            seed=0,
            work_dir=Path(work),
            hooks=hooks,
            bf16=detect_cpu().bf16_fast,
        )
        train_s = time.perf_counter() - start
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(result.model_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
        test = load_classification_file(SHARED / DATA[args.task][1])
        labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
        predicted: list[int] = []
        with torch.inference_mode():
            for k in range(0, len(test), 128):
                enc = tokenizer(
                    [x.text for x in test[k : k + 128]],
                    truncation=True,
                    max_length=128,
                    padding=True,
                    return_tensors="pt",
                )
                predicted.extend(model(**enc).logits.argmax(-1).tolist())
        report = classification_report([labels.index(x.label) for x in test], predicted, labels)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {
        "task": args.task,
        "test_accuracy": report["accuracy"],
        "test_macro_f1": report["macro_f1"],
        "train_seconds": train_s,
        "train_tokens_per_s": result.trained_tokens / train_s,
        "peak_rss_mb": peak_mb,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": spec.learning_rate,
        "reference": REFERENCE[args.task],
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"\n{'task':14} {'test acc':>9} {'macro-F1':>9} {'ref acc':>8} {'train s':>8} {'tok/s':>8} {'peak MB':>8}")
    print(
        f"{args.task:14} {row['test_accuracy']:9.3f} {row['test_macro_f1']:9.3f} "
        f"{REFERENCE[args.task]['accuracy']:8.3f} {train_s:8.0f} {row['train_tokens_per_s']:8.0f} {peak_mb:8.0f}"
    )
    out = ROOT / "benchmarks" / "results" / "finetune_quality.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    results = results if "task" not in results else {results["task"]: results}  # older single-row file
    results[args.task] = row
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
