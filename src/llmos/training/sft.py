"""Supervised chat fine-tuning of a causal LM: LoRA / IA3 through PEFT or full fine-tuning,
loss only on assistant tokens, bf16 autocast where it is fast (CPU or GPU); validation by loss and
token accuracy. The loop (checkpoints, resume, early stopping) is the shared one (see loop)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmos.training.adapters import save_for_serving, wrap_model
from llmos.training.chat_data import IGNORE, Example, load_chat_file
from llmos.training.device import bf16_autocast, to_model
from llmos.training.loop import E, Selection, StepOutput, TrainingTask, fit
from llmos.training.packing import pack
from llmos.training.run import TrainingResult, TrainingRun


def collate(batch: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Token ids, labels and the model's masking inputs: a padding mask, or for packed rows the
    position ids that keep their conversations apart (padding then forms a segment of its own)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    positions = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
        positions[i, :n] = torch.tensor(e.position_ids if e.position_ids is not None else range(n))
        positions[i, n:] = torch.arange(width - n)
    if any(e.position_ids is not None for e in batch):
        return ids, labels, {"position_ids": positions}
    return ids, labels, {"attention_mask": mask}


def _loss_and_accuracy(model: Any, batch: list[Example], pad_id: int, autocast: bool) -> tuple[torch.Tensor, int, int]:
    ids, labels, masking = collate(batch, pad_id)
    ids, labels, masking = to_model(model, ids), to_model(model, labels), to_model(model, masking)
    # Logits only where a label follows (the assistant's tokens): the output layer is a fifth of
    # SmolLM2's weights, and most positions of a chat example are the prompt.
    keep = (labels[:, 1:] != IGNORE).any(dim=0).nonzero().flatten()
    if len(keep) == 0:
        keep = torch.tensor([0], device=labels.device)
    targets = labels[:, keep + 1]
    with bf16_autocast(model, autocast):
        # No cache: transformers builds the packed rows' block-diagonal mask only when there is none.
        logits = model(
            input_ids=ids, use_cache=False, logits_to_keep=keep + _virtual_tokens(model), **masking
        ).logits.float()
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE
    )
    counted = targets != IGNORE
    correct = int(((logits.argmax(-1) == targets) & counted).sum())
    return loss, correct, int(counted.sum())


def _virtual_tokens(model: Any) -> int:
    """Prompt tuning runs its virtual tokens before the real ones, so real positions shift by their number."""
    config = getattr(model, "peft_config", {}).get("default")
    if config is not None and str(config.peft_type).endswith("PROMPT_TUNING"):
        return int(config.num_virtual_tokens)
    return 0


@torch.no_grad()
def evaluate(model: Any, examples: list[Example], batch_size: int, pad_id: int, autocast: bool) -> dict[str, float]:
    model.eval()
    total_loss, correct, counted = 0.0, 0, 0
    for k in range(0, len(examples), batch_size):
        loss, c, n = _loss_and_accuracy(model, examples[k : k + batch_size], pad_id, autocast)
        total_loss += loss.item() * n
        correct, counted = correct + c, counted + n
    model.train()
    return {"valid_loss": total_loss / max(1, counted), "valid_mean_token_accuracy": correct / max(1, counted)}


class CausalLMTask(TrainingTask[E]):
    """A task that trains a chat model (SFT, DPO): saved as the engine serves it, with its tokenizer."""

    run: TrainingRun
    tokenizer: Any

    def save_checkpoint_model(self, directory: Path) -> None:
        if save_for_serving(self.model, self.run.spec, directory, final=False):
            self.tokenizer.save_pretrained(directory)

    def save_result(self, directory: Path) -> None:
        save_for_serving(self.model, self.run.spec, directory)
        self.tokenizer.save_pretrained(directory)


class ChatTask(CausalLMTask[Example]):
    """Chat SFT as a task of the shared loop: validation loss ranks epochs, and the last epoch is
    the result (as OpenAI's fine-tuning keeps it)."""

    accuracy_name = "train_mean_token_accuracy"
    selection = Selection(metric="valid_loss", higher_is_better=False, keep_best=False)

    def __init__(
        self, run: TrainingRun, model: Any, tokenizer: Any, train: list[Example], valid: list[Example]
    ) -> None:
        self.run, self.model, self.tokenizer, self.train, self.valid = run, model, tokenizer, train, valid
        self.pad_id = pad_id(tokenizer)
        self.description = f"chat on {len(train)} examples"

    @staticmethod
    def length(example: Example) -> int:
        return len(example.input_ids)

    def step(self, batch: list[Example]) -> StepOutput:
        loss, correct, counted = _loss_and_accuracy(self.model, batch, self.pad_id, self.run.bf16)
        return StepOutput(loss, correct, counted, tokens=sum(len(e.input_ids) for e in batch))

    def evaluate(self) -> dict[str, Any] | None:
        if not self.valid:
            return None
        return evaluate(self.model, self.valid, self.run.spec.batch_size, self.pad_id, self.run.bf16)


def run_sft(run: TrainingRun) -> TrainingResult:
    from transformers import AutoTokenizer

    torch.manual_seed(run.seed)
    tokenizer = AutoTokenizer.from_pretrained(run.base_dir)
    train = load_chat_file(run.train_path, tokenizer, run.spec.max_seq_length)
    valid = load_chat_file(run.valid_path, tokenizer, run.spec.max_seq_length) if run.valid_path else []
    if not train:
        raise ValueError("no training example has an assistant token left after truncation to max_seq_length")
    if run.spec.packing:
        packed = pack(train, run.spec.max_seq_length)
        run.hooks.message(f"Packed {len(train)} conversations into {len(packed)} rows")
        train = packed
    return fit(ChatTask(run, load_causal_model(run, len(train)), tokenizer, train, valid), run)


def pad_id(tokenizer: Any) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def load_causal_model(run: TrainingRun, examples: int) -> Any:
    """The base model from ``run.base_dir``, wrapped by the run's method for ``examples`` training examples."""
    from transformers import AutoModelForCausalLM

    # With an adapter on a bf16-fast CPU the frozen base is kept in bf16: autocast would otherwise
    # cast every fp32 weight to bf16 again in each forward and backward. What trains stays fp32.
    frozen_bf16 = run.bf16 and run.spec.adapter != "full"
    base = AutoModelForCausalLM.from_pretrained(run.base_dir, dtype=torch.bfloat16 if frozen_bf16 else torch.float32)
    model = wrap_model(base, run.spec, "CAUSAL_LM", run.spec.total_steps(examples))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return model.to(run.device)
