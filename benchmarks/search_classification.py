"""A hyperparameter search on Banking77 or SST-2 with all-MiniLM-L6-v2, through the platform's own
search (trials are fine-tuning jobs in worker processes, the study in the database), against the
default recipe on the same data and the same epoch budget.

    python benchmarks/search_classification.py [--dataset banking77] [--train-per-class 26] [--trials 4]
    python benchmarks/search_classification.py --dataset sst2 --train-per-class 1500 --valid-per-class 250

Train and validation are drawn per class (seeded) from the dataset's train split, so each trial is
cheap; the best trial's model and the default recipe's are both scored on the full test split
(Banking77: 3,080 queries; SST-2: 1,821 sentences). Writes
benchmarks/results/search_<dataset>-<date>-<commit>.json with every trial, the best, the test
scores, wall time and the CPU seconds of all jobs.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import ROOT, write_result

DATASETS = ROOT.parent / "shared" / "datasets"


@dataclass(frozen=True)
class Dataset:
    train: str
    test: str
    text: str
    label: str
    max_seq_length: int
    default_recipe: dict[str, float]
    reference: float
    """finetune_quality.py's test accuracy with the default recipe on all the training data."""
    reference_note: str


DATASET = {
    "banking77": Dataset(
        "banking77/train.csv", "banking77/test.csv", "text", "category", 64,
        {"learning_rate_multiplier": 10.0, "batch_size": 32, "warmup_ratio": 0.06},
        0.923, "all 10,003 training queries, 5 epochs, lr 2e-4",
    ),
    "sst2": Dataset(
        "sst2/train.tsv", "sst2/test.tsv", "sentence", "label", 128,
        {"learning_rate_multiplier": 2.5, "batch_size": 32, "warmup_ratio": 0.06},
        0.885, "all 6,920 training sentences, 2 epochs, lr 5e-5",
    ),
}  # fmt: skip


def split(data: Dataset, per_class_train: int, per_class_valid: int, work: Path) -> tuple[Path, Path]:
    by_label: dict[str, list[dict[str, str]]] = defaultdict(list)
    with (DATASETS / data.train).open(encoding="utf-8") as f:
        delimiter = "\t" if data.train.endswith(".tsv") else ","
        for row in csv.DictReader(
            f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        ):
            by_label[row[data.label]].append({"text": row[data.text], "category": row[data.label]})
    rng = random.Random(0)
    train, valid = [], []
    for rows in by_label.values():
        rng.shuffle(rows)
        train += rows[:per_class_train]
        valid += rows[per_class_train : per_class_train + per_class_valid]
    rng.shuffle(train)
    paths = []
    for name, rows in (("train.csv", train), ("valid.csv", valid)):
        path = work / name
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "category"])
            writer.writeheader()
            writer.writerows(rows)
        paths.append(path)
    return paths[0], paths[1]


def test_accuracy(data: Dataset, model_dir: Path) -> float:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llmos.engine.torch_backend.prompted_encoder import load_prompted
    from llmos.training.classify import load_classification_file

    model = load_prompted(AutoModelForSequenceClassification.from_pretrained(model_dir), model_dir)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    test = load_classification_file(DATASETS / data.test)
    labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    right = 0
    with torch.inference_mode():
        for k in range(0, len(test), 128):
            batch = test[k : k + 128]
            texts = [x.text for x in batch]
            enc = tokenizer(texts, truncation=True, max_length=data.max_seq_length, padding=True, return_tensors="pt")
            predicted = model(**enc).logits.argmax(-1).tolist()
            right += sum(labels[p] == x.label for p, x in zip(predicted, batch, strict=True))
    return right / len(test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATASET), default="banking77")
    parser.add_argument("--train-per-class", type=int, default=26)
    parser.add_argument("--valid-per-class", type=int, default=13)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2, help="every trial's and the default recipe's")
    parser.add_argument("--max-wall-seconds", type=int, default=1800)
    parser.add_argument("--models-home", type=Path, default=ROOT / ".cache" / "bench-home")
    args = parser.parse_args()
    data = DATASET[args.dataset]

    from llmos.config import Settings
    from llmos.kernel.supervisor import JobSupervisor
    from llmos.platform import Platform
    from llmos.training.classify import load_classification_file
    from llmos.training.search.runner import SearchRunner
    from llmos.training.search.service import SearchService
    from llmos.training.search.study import public_trial, trials

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        settings = Settings(home=work / "home", max_concurrent_jobs=1)
        platform = Platform.open(settings)
        source = Platform.open(Settings(home=args.models_home))
        base_dir = source.registry.model_dir(source.registry.get("all-minilm-l6-v2"))
        platform.registry.pull(f"file:{base_dir}", name="all-minilm-l6-v2")
        source.close()
        train_path, valid_path = split(data, args.train_per_class, args.valid_per_class, work)
        ids = []
        for path in (train_path, valid_path):
            content = path.read_bytes()
            record, _ = platform.files.create(
                tenant="default", purpose="fine-tune", filename=path.name, chunks=[content], max_bytes=len(content)
            )
            ids.append(record.id)
        method = {
            "type": "supervised",
            "supervised": {
                "adapter": {"type": "full"},
                "max_seq_length": data.max_seq_length,
                "hyperparameters": {"n_epochs": args.epochs},
            },
        }
        body: dict[str, Any] = {
            "model": "all-minilm-l6-v2",
            "training_file": ids[0],
            "validation_file": ids[1],
            "seed": 0,
            "method": method,
            "search_space": {
                "learning_rate": {"type": "float", "low": 5e-5, "high": 2e-3, "log": True},
                "batch_size": {"type": "categorical", "choices": [16, 32]},
                "warmup_ratio": {"type": "float", "low": 0.0, "high": 0.1},
                "weight_decay": {"type": "float", "low": 0.0, "high": 0.1},
            },
            "sampler": {"type": "tpe", "n_startup_trials": max(1, args.trials - 1)},
            "pruner": {"type": "median", "n_startup_trials": 1},
            "budget": {"max_trials": args.trials, "max_wall_seconds": args.max_wall_seconds},
        }
        searches = SearchService(platform.db, settings.db_url, platform.registry, platform.files, platform.jobs)
        supervisor = JobSupervisor(platform.jobs, platform.training_quota, settings)
        runner = SearchRunner(searches, platform.jobs, platform.registry)
        start = time.perf_counter()
        search = searches.create(tenant="default", key_id=None, body=body, idempotency_key=None)
        supervisor.start()
        runner.start()
        while searches.store.get(None, search.id).status.value not in ("succeeded", "failed", "cancelled"):
            time.sleep(5)
        search_s = time.perf_counter() - start
        runner.stop()
        done = searches.public(searches.store.get(None, search.id))
        rows = [public_trial(t) for t in trials(searches.storage, search.id)]
        for row in rows:
            print(row["number"], row["state"], row["value"], row["params"], row["note"] or "")
        default_body = {
            "model": "all-minilm-l6-v2",
            "training_file": ids[0],
            "validation_file": ids[1],
            "seed": 0,
            "method": {
                **method,
                "supervised": {
                    **method["supervised"],
                    "warmup_ratio": data.default_recipe["warmup_ratio"],
                    "hyperparameters": {
                        "n_epochs": args.epochs,
                        "batch_size": data.default_recipe["batch_size"],
                        "learning_rate_multiplier": data.default_recipe["learning_rate_multiplier"],
                    },
                },
            },
        }
        start = time.perf_counter()
        job = platform.jobs.create(tenant="default", body=default_body)
        while platform.jobs.get(None, job.id).status.value not in ("succeeded", "failed", "cancelled"):
            time.sleep(5)
        default_s = time.perf_counter() - start
        supervisor.stop()
        default_job = platform.jobs.get(None, job.id)
        best_model = platform.registry.get(done["fine_tuned_model"]) if done["fine_tuned_model"] else None
        default_name = default_job.fine_tuned_model
        default_model = platform.registry.get(default_name) if default_name else None
        result = {
            "dataset": args.dataset,
            "train_examples": len(load_classification_file(train_path)),
            "valid_examples": len(load_classification_file(valid_path)),
            "epochs": args.epochs,
            "search": {k: done[k] for k in ("status", "trials", "best_trial", "cpu_seconds", "sampler", "pruner")},
            "search_wall_seconds": search_s,
            "trials": rows,
            "best_test_accuracy": test_accuracy(data, platform.registry.model_dir(best_model)) if best_model else None,
            "best_valid_accuracy": done["best_trial"]["value"] if done["best_trial"] else None,
            "default_recipe": data.default_recipe,
            "default_test_accuracy": (
                test_accuracy(data, platform.registry.model_dir(default_model)) if default_model else None
            ),
            "default_valid_accuracy": default_model.extra["metrics"]["valid_accuracy"] if default_model else None,
            "default_wall_seconds": default_s,
            "default_cpu_seconds": default_job.cpu_seconds,
            "reference_full_data": {"test_accuracy": data.reference, "recipe": data.reference_note},
            "date": time.strftime("%Y-%m-%d"),
        }
        searches.close()
        platform.close()
    print(
        f"\nsearch {done['status']}: {done['trials']} in {search_s:.0f} s ({done['cpu_seconds']:.0f} CPU s); best "
        f"valid {result['best_valid_accuracy']}, test {result['best_test_accuracy']}\n"
        f"default recipe, same data and epochs: valid {result['default_valid_accuracy']}, test "
        f"{result['default_test_accuracy']} in {default_s:.0f} s; {data.reference_note}: {data.reference}"
    )
    write_result(f"search_{args.dataset}", result)


if __name__ == "__main__":
    main()
