"""Direct preference optimisation (Rafailov et al., 2023, the sigmoid loss) on OpenAI's preference
lines, as a task of the shared loop: LoRA or full fine-tuning of a chat model.

A pair is a prompt with a preferred and a non-preferred completion. A side's log-probability is
the sum over its completion's tokens only (the prompt is context). The reference model's
log-probabilities are computed once, before the first step, from the model as it is then: for an
adapter method with its adapters disabled (PEFT's ``disable_adapter``), for full fine-tuning the
untouched weights. The reference is thus frozen without a second copy of the model in memory, and
a resumed run keeps the very same reference (the task is built before the loop loads a checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from llmos.training.chat_data import IGNORE, Example, template_messages
from llmos.training.device import bf16_autocast, to_model
from llmos.training.loop import Selection, StepOutput, fit
from llmos.training.run import TrainingResult, TrainingRun
from llmos.training.sft import CausalLMTask, collate, load_causal_model, pad_id


@dataclass(frozen=True)
class Pair:
    """A prompt with its preferred (``chosen``) and non-preferred (``rejected``) completion, each
    tokenised with the prompt and labelled on its completion only; with the reference model's
    summed completion log-probabilities once computed."""

    chosen: Example
    rejected: Example
    reference_chosen: float = 0.0
    reference_rejected: float = 0.0

    @property
    def tokens(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


def encode_completion(
    tokenizer: Any, prompt: list[dict[str, str]], output: list[dict[str, str]], max_len: int
) -> Example | None:
    """Prompt and completion through the chat template, labels on the completion's tokens (those
    after the prompt with its generation prompt, whatever the template writes). Too long: the
    prompt loses its start, so the completion stays whole where it fits. None: no completion token."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    text = tokenizer.apply_chat_template(prompt + output, tokenize=False)
    start = len(os.path.commonprefix([prompt_text, text]))  # noqa: RUF071 -- texts, not paths
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = list(enc["input_ids"])[-max_len:]
    offsets = list(enc["offset_mapping"])[-max_len:]
    labels = [token if end > start else IGNORE for token, (_, end) in zip(ids, offsets, strict=True)]
    if labels[0] != IGNORE:  # the first token predicts nothing: a completion needs a token before it
        labels[0] = IGNORE
    if all(label == IGNORE for label in labels):
        return None
    return Example(ids, labels)


def load_pairs(path: Path, tokenizer: Any, max_len: int) -> list[Pair]:
    """The preference lines of a (validated) training file as pairs; a pair with a side left
    without completion tokens is dropped."""
    pairs = []
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        prompt = template_messages(record["input"]["messages"])
        chosen = encode_completion(tokenizer, prompt, template_messages(record["preferred_output"]), max_len)
        rejected = encode_completion(tokenizer, prompt, template_messages(record["non_preferred_output"]), max_len)
        if chosen is not None and rejected is not None:
            pairs.append(Pair(chosen, rejected))
    return pairs


def completion_logps(model: Any, sequences: list[Example], pad: int, autocast: bool) -> torch.Tensor:
    """Each sequence's summed log-probability of its labelled (completion) tokens."""
    ids, labels, masking = collate(sequences, pad)
    ids, labels, masking = to_model(model, ids), to_model(model, labels), to_model(model, masking)
    # Logits only from the position before the earliest completion token on: the output layer is a
    # large share of a small model's compute, and prompts are most of a preference pair.
    start = int((labels != IGNORE).int().argmax(dim=1).min())
    keep = ids.shape[1] - start + 1
    with bf16_autocast(model, autocast):
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep, **masking).logits.float()
    targets = labels[:, start:]
    logps = logits[:, -keep:-1].log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logps * (targets != IGNORE)).sum(-1)


@dataclass(frozen=True)
class Preferences:
    """A batch of pairs scored: the DPO loss of each pair and its implicit rewards
    (``beta`` times the policy's log-probability ratio to the reference)."""

    loss: torch.Tensor
    chosen_reward: torch.Tensor
    rejected_reward: torch.Tensor

    @property
    def margin(self) -> torch.Tensor:
        return self.chosen_reward - self.rejected_reward

    @property
    def right(self) -> int:
        """Pairs whose preferred completion has the higher reward."""
        return int((self.margin > 0).sum())


def score(model: Any, pairs: list[Pair], beta: float, pad: int, autocast: bool) -> Preferences:
    logps = completion_logps(model, [p.chosen for p in pairs] + [p.rejected for p in pairs], pad, autocast)
    chosen = beta * (logps[: len(pairs)] - torch.tensor([p.reference_chosen for p in pairs], device=logps.device))
    rejected = beta * (logps[len(pairs) :] - torch.tensor([p.reference_rejected for p in pairs], device=logps.device))
    loss = -torch.nn.functional.logsigmoid(chosen - rejected)
    return Preferences(loss, chosen.detach(), rejected.detach())


def _reference(model: Any) -> contextlib.AbstractContextManager[Any]:
    """The model as the reference: an adapter method's base with its adapters off; else the model itself."""
    from peft import PeftModel

    return model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext()


class DPOTask(CausalLMTask[Pair]):
    """DPO as a task of the shared loop: validation loss ranks epochs, the last epoch is the result."""

    accuracy_name = "train_preference_accuracy"
    selection = Selection(metric="valid_loss", higher_is_better=False, keep_best=False)

    def __init__(self, run: TrainingRun, model: Any, tokenizer: Any, train: list[Pair], valid: list[Pair]) -> None:
        assert run.spec.beta is not None, "a DPO run's spec has its beta"
        self.run, self.model, self.tokenizer, self.beta = run, model, tokenizer, run.spec.beta
        self.pad_id = pad_id(tokenizer)
        self.train, self.valid = self.with_reference(train), self.with_reference(valid)
        self.description = f"DPO (beta {self.beta}) on {len(train)} preference pairs"

    @staticmethod
    def length(pair: Pair) -> int:
        return pair.tokens

    @torch.no_grad()
    def with_reference(self, pairs: list[Pair]) -> list[Pair]:
        """``pairs`` with the reference model's log-probabilities (dropout off, as in evaluation)."""
        self.model.eval()
        scored: list[Pair] = []
        size = self.run.spec.batch_size
        with _reference(self.model):
            for k in range(0, len(pairs), size):
                batch = pairs[k : k + size]
                logps = completion_logps(
                    self.model, [p.chosen for p in batch] + [p.rejected for p in batch], self.pad_id, self.run.bf16
                ).tolist()
                scored += [
                    replace(p, reference_chosen=c, reference_rejected=r)
                    for p, c, r in zip(batch, logps[: len(batch)], logps[len(batch) :], strict=True)
                ]
        self.model.train()
        return scored

    def step(self, batch: list[Pair]) -> StepOutput:
        scored = score(self.model, batch, self.beta, self.pad_id, self.run.bf16)
        return StepOutput(scored.loss.mean(), scored.right, len(batch), tokens=sum(p.tokens for p in batch))

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any] | None:
        """Validation pairs' mean loss, rewards and reward margin, and the share of pairs ranked right."""
        if not self.valid:
            return None
        self.model.eval()
        loss = chosen = rejected = 0.0
        right = 0
        size = self.run.spec.batch_size
        for k in range(0, len(self.valid), size):
            scored = score(self.model, self.valid[k : k + size], self.beta, self.pad_id, self.run.bf16)
            loss += float(scored.loss.sum())
            chosen += float(scored.chosen_reward.sum())
            rejected += float(scored.rejected_reward.sum())
            right += scored.right
        self.model.train()
        n = len(self.valid)
        return {
            "valid_loss": loss / n,
            "valid_preference_accuracy": right / n,
            "valid_reward_margin": (chosen - rejected) / n,
            "valid_chosen_reward": chosen / n,
            "valid_rejected_reward": rejected / n,
        }


def run_dpo(run: TrainingRun) -> TrainingResult:
    from transformers import AutoTokenizer

    torch.manual_seed(run.seed)
    tokenizer = AutoTokenizer.from_pretrained(run.base_dir)
    train = load_pairs(run.train_path, tokenizer, run.spec.max_seq_length)
    valid = load_pairs(run.valid_path, tokenizer, run.spec.max_seq_length) if run.valid_path else []
    if not train:
        raise ValueError("no preference pair has completion tokens left on both sides after truncation")
    model = load_causal_model(run, len(train))
    return fit(DPOTask(run, model, tokenizer, train, valid), run)
