"""Pre-training a Llama-architecture model from raw text, as a task of the one loop (ADR 0022):
the loop's resume, accumulation, schedule, clipping, checkpoints, pause, cancel and early stopping
are the ones every job has; this module supplies the corpus, the model and what is measured.

The corpus is one stream of token ids (documents joined by the end-of-text token). An epoch is as
many windows of ``max_seq_length`` tokens as the stream holds, each starting at an offset drawn
from the epoch's seeded generator, so a resumed run draws the very windows of an unstopped one.
Every row is full (packed: no padding); where a window crosses a document boundary, positions
restart at the end-of-text token that opens each document and transformers builds the
block-diagonal causal mask from them (as packed chat rows do), so no token attends across
documents. Validation reports the loss
per token, per character and in bits per byte of the held-out text, and sample continuations."""

from __future__ import annotations

import math
import os
import random
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from llmos.registry.store import link_or_copy
from llmos.training.checkpoints import Restored, latest_restorable
from llmos.training.corpus import read_text, split_corpus
from llmos.training.device import bf16_autocast, to_model
from llmos.training.loop import Selection, StepOutput, checkpoint_source, fit
from llmos.training.model_presets import llama_config
from llmos.training.pretrain_spec import PretrainSpec
from llmos.training.run import PretrainInputs, TrainingResult, TrainingRun
from llmos.training.sft import CausalLMTask
from llmos.training.tokenizer_training import (
    TokenStream,
    encode_documents,
    end_of_text,
    load_tokenizer,
    train_bpe,
)

TOKENIZER_DIR = "tokenizer"
"""Where in the job's directory, and in each of its checkpoints, its trained tokenizer is kept."""
SAMPLE_TEMPERATURE = 0.8
SAMPLE_PROMPT_CHARS = 64


class PretrainTask(CausalLMTask[int]):
    """The loop's task: a batch is a list of window offsets into the training stream."""

    accuracy_name = "train_accuracy"
    # Early stopping keeps the best epoch, not the last: a model pre-trained past its best has only overfitted.
    selection = Selection(metric="valid_loss", higher_is_better=False, keep_best=True)

    def __init__(
        self,
        run: TrainingRun,
        pretrain: PretrainSpec,
        model: Any,
        tokenizer: Any,
        train: TokenStream,
        valid: TokenStream,
        trained_tokenizer: Path | None = None,
    ) -> None:
        self.run, self.pretrain, self.model, self.tokenizer = run, pretrain, model, tokenizer
        self.trained_tokenizer = trained_tokenizer
        """The directory of the tokenizer this job trained (None: a registered model's)."""
        self.context = run.spec.max_seq_length
        if len(train) < self.context + 2:
            raise ValueError(
                f"the training corpus has {len(train)} tokens, fewer than one window of max_seq_length "
                f"{self.context}: upload more text or lower max_seq_length"
            )
        self.stream, self.valid = train.ids, valid
        held_out = tokenizer.decode(valid.ids[: SAMPLE_PROMPT_CHARS + 1], skip_special_tokens=True)
        self.first_line = held_out.split("\n", 1)[0][:SAMPLE_PROMPT_CHARS]
        """The default sample prompt: where the held-out text starts (a corpus that is one document
        has almost never seen end-of-text alone, so an empty prompt would show little)."""
        self.eos = end_of_text(tokenizer)
        self.train = range((len(train) - 1) // self.context)
        parameters = sum(p.numel() for p in model.parameters())
        self.description = (
            f"{pretrain.model} from scratch ({parameters / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}) on "
            f"{len(train)} tokens ({train.characters / max(1, len(train)):.2f} characters a token)"
        )

    def checkpoint_files(self) -> dict[str, Path]:
        """A tokenizer the job trained goes with each checkpoint: its weights mean nothing with another."""
        if self.trained_tokenizer is None:
            return {}
        return {f"{TOKENIZER_DIR}/{f.name}": f for f in sorted(self.trained_tokenizer.iterdir()) if f.is_file()}

    @property
    def generator(self) -> Any:
        """The model as transformers' generation sees it (typed as a plain module by the loop)."""
        return self.model

    def epoch_batches(self, rng: random.Random, size: int, by_length: bool) -> list[list[int]]:
        last = len(self.stream) - self.context - 1
        starts = [rng.randint(0, last) for _ in self.train]
        return [starts[k : k + size] for k in range(0, len(starts), size)]

    def step(self, batch: list[int]) -> StepOutput:
        ids, targets = self._windows(self.stream, batch, self.context)
        loss, correct = self._loss(ids, targets, "mean")
        return StepOutput(loss, correct, targets.numel(), tokens=ids.numel())

    def _windows(self, stream: torch.Tensor, starts: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = stream[torch.tensor(starts)[:, None] + torch.arange(width + 1)].long()
        return rows[:, :-1], rows[:, 1:]

    def _loss(self, ids: torch.Tensor, targets: torch.Tensor, reduction: str) -> tuple[torch.Tensor, int]:
        ids, targets = to_model(self.model, ids), to_model(self.model, targets)
        with bf16_autocast(self.model, self.run.bf16):
            logits = self.model(input_ids=ids, position_ids=positions(ids, self.eos), use_cache=False).logits
        logits = logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction
        )
        return loss, int((logits.argmax(-1) == targets).sum())

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any] | None:
        """Loss over every held-out token (the stream opens with end-of-text, so each character's
        tokens are predicted), per token, per character and in bits per byte; then samples."""
        self.model.eval()
        ids, width = self.valid.ids, self.context
        full = list(range(0, (len(ids) - 1) // width * width, width))
        nll, correct = 0.0, 0
        size = self.run.spec.batch_size
        for k in range(0, len(full), size):
            loss, right = self._loss(*self._windows(ids, full[k : k + size], width), "sum")
            nll, correct = nll + loss.item(), correct + right
        tail = len(ids) - 1 - len(full) * width
        if tail:
            loss, right = self._loss(*self._windows(ids, [len(full) * width], tail), "sum")
            nll, correct = nll + loss.item(), correct + right
        predicted = len(ids) - 1
        metrics = {
            "valid_loss": nll / predicted,
            "valid_loss_per_char": nll / max(1, self.valid.characters),
            "valid_bits_per_byte": nll / math.log(2) / max(1, self.valid.utf8_bytes),
            "valid_accuracy": correct / predicted,
        }
        self._report_samples()
        self.model.train()
        return metrics

    def _report_samples(self) -> None:
        """A continuation of each sample prompt, as message events. Drawn from a generator of its
        own seeded by the job: the same text for the same weights, and the loop's random stream untouched."""
        new = min(self.pretrain.sample_tokens, self.context - 1)
        for prompt in self.pretrain.sample_prompts or (self.first_line,):
            ids = [self.eos, *self.tokenizer(prompt, add_special_tokens=False)["input_ids"]][-(self.context - new) :]
            with torch.random.fork_rng(), bf16_autocast(self.model, self.run.bf16):
                torch.manual_seed(self.run.seed)
                out = self.generator.generate(
                    to_model(self.model, torch.tensor([ids])),
                    max_new_tokens=new,
                    do_sample=True,
                    temperature=SAMPLE_TEMPERATURE,
                    top_k=0,
                    pad_token_id=self.eos,
                    eos_token_id=self.eos,
                )
            text = self.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
            self.run.hooks.message(f"Sample: {prompt}{text}"[:1900])


def positions(ids: torch.Tensor, eos: int) -> torch.Tensor:
    """Position ids of packed rows: counting from each row's start, and from 0 again at each
    end-of-text token, which opens the next document's segment: the document's first token is
    predicted from that token alone, as a served prompt (which starts with it) predicts it."""
    index = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    starts = ids == eos
    starts[:, 0] = True
    return index - torch.cummax(torch.where(starts, index, 0), dim=1).values


def run_pretrain(run: TrainingRun) -> TrainingResult:
    from transformers import LlamaForCausalLM

    if run.pretrain is None:
        raise ValueError("a pre-training run needs its pre-training inputs")
    inputs, spec = run.pretrain, run.pretrain.spec
    texts = [read_text(path) for path in (run.train_path, *inputs.more_training_paths)]
    if run.valid_path is not None:
        valid_texts = [read_text(run.valid_path)]
    else:
        texts, valid_texts = split_corpus(texts, spec.validation_split, run.seed)
        run.hooks.message(
            f"Held out {sum(map(len, valid_texts))} of {sum(map(len, texts + valid_texts))} characters for "
            f"validation ({len(valid_texts)} blocks drawn with the job's seed)"
        )
    checkpoint: Path | None = None
    if inputs.tokenizer_dir is None:  # its tokenizer may be stored with the checkpoint resumed from
        run, checkpoint = _resume_point(run)
    tokenizer, trained = _tokenizer(run, inputs, texts, checkpoint)
    train, valid = encode_documents(tokenizer, texts), encode_documents(tokenizer, valid_texts)
    del texts, valid_texts
    torch.manual_seed(run.seed)  # the initial weights
    config = llama_config(
        spec.dims, len(tokenizer), run.spec.max_seq_length, bos_id=tokenizer.bos_token_id, eos_id=end_of_text(tokenizer)
    )
    model: Any = LlamaForCausalLM(config)
    model = model.to(run.device)
    return fit(PretrainTask(run, spec, model, tokenizer, train, valid, trained), run)


def _resume_point(run: TrainingRun) -> tuple[TrainingRun, Path | None]:
    """The checkpoint a resume starts from, laid out now (for its tokenizer), and ``run`` reading
    it from there: the training loop's resume then restores nothing again."""
    source = checkpoint_source(run)
    found = latest_restorable(source, run.hooks.message)
    if found is None:
        return run, None
    return replace(run, checkpoints=Restored(source, *found)), found[1]


def _tokenizer(
    run: TrainingRun, inputs: PretrainInputs, texts: list[str], checkpoint: Path | None
) -> tuple[Any, Path | None]:
    """The registered model's tokenizer; or the BPE this job trained, and where it is kept in the
    work directory. A resume takes the one stored with ``checkpoint``, the one it resumes from (on
    any node), else the one the work directory kept (checkpoints written before they carried it),
    and trains one only when neither is there."""
    if inputs.tokenizer_dir is not None:
        return load_tokenizer(inputs.tokenizer_dir), None
    saved = run.work_dir / TOKENIZER_DIR
    stored = checkpoint / TOKENIZER_DIR if checkpoint is not None else None
    if stored is not None and stored.is_dir():
        _replace_dir(stored, saved)
    if saved.is_dir():
        return load_tokenizer(saved), saved
    vocab = inputs.spec.vocab_size or 0
    tokenizer = train_bpe(texts, vocab, saved)
    run.hooks.message(f"Trained a byte-level BPE tokenizer of {len(tokenizer)} tokens (asked {vocab})")
    return tokenizer, saved


def _replace_dir(src: Path, target: Path) -> None:
    """``target`` becomes a copy of ``src``'s files (linked where it can be), atomically."""
    partial = target.with_name(target.name + ".tmp")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            link_or_copy(f, partial / f.name)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
