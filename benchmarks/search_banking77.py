"""A hyperparameter search on Banking77 with all-MiniLM-L6-v2, through the platform's own search
(trials are fine-tuning jobs in worker processes, the study in the database), against the
default recipe on the same data and the same epoch budget.

    python benchmarks/search_banking77.py [--train-per-class 26] [--valid-per-class 13] [--trials 4]

Train and validation are drawn per class (seeded) from Banking77's train split, so each trial is
cheap; the best trial's model and the default recipe's are both scored on the full test split
(3,080 queries). Writes benchmarks/results/search_banking77-<date>-<commit>.json with every trial,
the best, the test scores, wall time and the CPU seconds of all jobs.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import ROOT, write_result

SHARED = ROOT.parent / "shared" / "datasets" / "banking77"
DEFAULT_RECIPE = {"learning_rate_multiplier": 10.0, "batch_size": 32, "warmup_ratio": 0.06}
"""finetune_quality.py's Banking77 recipe (full fine-tuning, lr 2e-4, 6% warm-up): 0.923 with 5 epochs on all data."""


def split(per_class_train: int, per_class_valid: int, work: Path) -> tuple[Path, Path]:
    by_label: dict[str, list[dict[str, str]]] = defaultdict(list)
    with (SHARED / "train.csv").open(encoding="utf-8") as f:
        for row in csv.DictReader(f):
            by_label[row["category"]].append(row)
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


def test_accuracy(model_dir: Path) -> float:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llmos.engine.torch_backend.prompted_encoder import load_prompted
    from llmos.training.classify import load_classification_file

    model = load_prompted(AutoModelForSequenceClassification.from_pretrained(model_dir), model_dir)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    test = load_classification_file(SHARED / "test.csv")
    labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    right = 0
    with torch.inference_mode():
        for k in range(0, len(test), 128):
            batch = test[k : k + 128]
            enc = tokenizer([x.text for x in batch], truncation=True, max_length=64, padding=True, return_tensors="pt")
            predicted = model(**enc).logits.argmax(-1).tolist()
            right += sum(labels[p] == x.label for p, x in zip(predicted, batch, strict=True))
    return right / len(test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-per-class", type=int, default=26)
    parser.add_argument("--valid-per-class", type=int, default=13)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2, help="every trial's and the default recipe's")
    parser.add_argument("--max-wall-seconds", type=int, default=1800)
    parser.add_argument("--models-home", type=Path, default=ROOT / ".cache" / "bench-home")
    args = parser.parse_args()

    from llmos.config import Settings
    from llmos.kernel.supervisor import JobSupervisor
    from llmos.platform import Platform
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
        train_path, valid_path = split(args.train_per_class, args.valid_per_class, work)
        ids = []
        for path in (train_path, valid_path):
            data = path.read_bytes()
            record, _ = platform.files.create(
                tenant="default", purpose="fine-tune", filename=path.name, chunks=[data], max_bytes=len(data)
            )
            ids.append(record.id)
        method = {
            "type": "supervised",
            "supervised": {
                "adapter": {"type": "full"},
                "max_seq_length": 64,
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
                    "warmup_ratio": DEFAULT_RECIPE["warmup_ratio"],
                    "hyperparameters": {
                        "n_epochs": args.epochs,
                        "batch_size": DEFAULT_RECIPE["batch_size"],
                        "learning_rate_multiplier": DEFAULT_RECIPE["learning_rate_multiplier"],
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
            "train_examples": 77 * args.train_per_class,
            "valid_examples": 77 * args.valid_per_class,
            "epochs": args.epochs,
            "search": {k: done[k] for k in ("status", "trials", "best_trial", "cpu_seconds", "sampler", "pruner")},
            "search_wall_seconds": search_s,
            "trials": rows,
            "best_test_accuracy": test_accuracy(platform.registry.model_dir(best_model)) if best_model else None,
            "best_valid_accuracy": done["best_trial"]["value"] if done["best_trial"] else None,
            "default_recipe": DEFAULT_RECIPE,
            "default_test_accuracy": (
                test_accuracy(platform.registry.model_dir(default_model)) if default_model else None
            ),
            "default_valid_accuracy": default_model.extra["metrics"]["valid_accuracy"] if default_model else None,
            "default_wall_seconds": default_s,
            "default_cpu_seconds": default_job.cpu_seconds,
            "reference_full_data_5_epochs": 0.923,
            "date": time.strftime("%Y-%m-%d"),
        }
        searches.close()
        platform.close()
    print(
        f"\nsearch {done['status']}: {done['trials']} in {search_s:.0f} s ({done['cpu_seconds']:.0f} CPU s); best "
        f"valid {result['best_valid_accuracy']}, test {result['best_test_accuracy']}\n"
        f"default recipe, same data and epochs: valid {result['default_valid_accuracy']}, test "
        f"{result['default_test_accuracy']} in {default_s:.0f} s; full data, 5 epochs: 0.923"
    )
    write_result("search_banking77", result)


if __name__ == "__main__":
    main()
