"""`llmos pretrain`: a pre-training job on a running server (uploading local corpus files first),
followed like a fine-tuning job (`--follow`: progress, events and the live loss curve)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from llmos.cli.client_cmds import HostOpt, KeyOpt, PortOpt
from llmos.cli.common import console
from llmos.cli.tuning import call, client_for, file_id, follow_progress
from llmos.training.corpus import CORPUS_PURPOSE


def pretrain(
    corpus: Annotated[list[str], typer.Argument(help="Corpus files (local paths or file ids), UTF-8 text.")],
    model: Annotated[str, typer.Option(help="llama-tiny, llama-small, or llama with every --dims.")] = "llama-tiny",
    validation_file: Annotated[str | None, typer.Option(help="Held-out text (default: a seeded split).")] = None,
    vocab_size: Annotated[int | None, typer.Option(help="Train a byte-level BPE of this size.")] = None,
    tokenizer_model: Annotated[str | None, typer.Option(help="Reuse this registered model's tokenizer.")] = None,
    dims: Annotated[
        list[str] | None, typer.Option(help="Architecture fields over the preset, e.g. hidden_size=384.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="n_epochs: passes over the corpus.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Windows a batch.")] = None,
    max_seq_length: Annotated[int | None, typer.Option(help="Tokens a window (the model's context).")] = None,
    lr_multiplier: Annotated[float | None, typer.Option(help="Times the base learning rate 1e-3.")] = None,
    suffix: Annotated[str | None, typer.Option(help="Part of the model's name.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for a reproducible run.")] = None,
    follow_job: Annotated[
        bool, typer.Option("--follow", help="Show progress and the loss curve until it ends.")
    ] = False,
    api_key: KeyOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Pre-train a Llama-architecture model from scratch on a text corpus (a fine-tuning job of
    method pretrain; see docs/fine-tuning.md)."""
    client = client_for(api_key, host, port)
    ids = [file_id(client, path, CORPUS_PURPOSE) for path in corpus]
    options: dict[str, Any] = {
        "hyperparameters": {
            k: v
            for k, v in {
                "n_epochs": epochs,
                "batch_size": batch_size,
                "learning_rate_multiplier": lr_multiplier,
            }.items()
            if v is not None
        }
    }
    if ids[1:]:
        options["training_files"] = ids[1:]
    if tokenizer_model is not None:
        options["tokenizer"] = {"type": "model", "model": tokenizer_model}
    elif vocab_size is not None:
        options["tokenizer"] = {"type": "bpe", "vocab_size": vocab_size}
    if max_seq_length is not None:
        options["max_seq_length"] = max_seq_length
    if dims:
        options["architecture"] = _dims(dims)
    body: dict[str, Any] = {
        "model": model,
        "training_file": ids[0],
        "method": {"type": "pretrain", "pretrain": options},
    }
    if validation_file:
        body["validation_file"] = file_id(client, validation_file, CORPUS_PURPOSE)
    if suffix:
        body["suffix"] = suffix
    if seed is not None:
        body["seed"] = seed
    job = call(client.post, "/fine_tuning/jobs", body=body, cast_to=dict)
    console.print(f"created job [bold]{job['id']}[/bold] ({job['status']})")
    if follow_job:
        follow_progress(client, job["id"])


def _dims(pairs: list[str]) -> dict[str, int]:
    """``name=integer`` pairs (the server checks names and ranges)."""
    out: dict[str, int] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if not value.strip().isdigit():
            raise typer.BadParameter(f"{pair!r}: expected name=integer", param_hint="--dims")
        out[name.strip()] = int(value)
    return out
