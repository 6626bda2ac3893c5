"""A pre-training job's tokenizer: a byte-level BPE trained on its corpus with ``tokenizers``, or a
registered model's own; and the corpus turned into one stream of token ids.

The trained tokenizer is written once into the job's directory (atomically) and goes with each
checkpoint (``pretrain.PretrainTask.checkpoint_files``), so a resumed run, on any node, reads the
very tokenizer the interrupted one trained rather than training it again."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

END_OF_TEXT = "<|endoftext|>"
"""The one special token of a trained tokenizer: it ends each document (and starts generation)."""
MIN_VOCAB = 257
"""The 256 bytes and the end-of-text token: a byte-level BPE can hold no fewer."""
ENCODE_CHARS = 1 << 20
"""Characters encoded at a time, so the token lists of a large corpus never exist all at once."""


def train_bpe(texts: Iterable[str], vocab_size: int, out: Path) -> Any:
    """A byte-level BPE of ``vocab_size`` tokens trained on ``texts`` (GPT-2's pre-tokenisation,
    every byte in the alphabet so any text encodes), saved as a transformers tokenizer in ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    # Served prompts (tokenised with special tokens) start as every training document does: after
    # end-of-text. The training stream itself is encoded without them and joined by that token.
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{END_OF_TEXT} $A", special_tokens=[(END_OF_TEXT, bpe.token_to_id(END_OF_TEXT))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT
    )
    save_atomically(tokenizer, out)
    return tokenizer


def save_atomically(tokenizer: Any, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def load_tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def end_of_text(tokenizer: Any) -> int:
    """The id that ends a document: the tokenizer's end-of-sequence token."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no end-of-sequence token to separate documents with")
    return int(tokenizer.eos_token_id)


@dataclass(frozen=True)
class TokenStream:
    """Documents as one row of token ids, the end-of-text id between them and at both ends, and the
    size of their text (to turn a loss per token into one per character and bits per byte)."""

    ids: torch.Tensor
    characters: int
    utf8_bytes: int

    def __len__(self) -> int:
        return len(self.ids)


def encode_documents(tokenizer: Any, texts: Iterable[str]) -> TokenStream:
    """``texts`` encoded (no special tokens added but the separators), each opened by the
    end-of-text id as a served prompt is, and the last one closed by it: every token of the text
    is predicted from something (validation counts the loss of each character)."""
    eos = end_of_text(tokenizer)
    parts = [torch.tensor([eos], dtype=torch.int32)]
    characters = utf8_bytes = 0
    for text in texts:
        start = 0
        while start < len(text):
            end = min(len(text), start + ENCODE_CHARS)
            if end < len(text):  # a piece ends at a line end where one is near: no word split in two
                newline = text.rfind("\n", end - ENCODE_CHARS // 8, end)
                end = newline + 1 if newline > start else end
            ids = tokenizer(text[start:end], add_special_tokens=False)["input_ids"]
            parts.append(torch.tensor(ids, dtype=torch.int32))
            start = end
        characters += len(text)
        utf8_bytes += len(text.encode())
        parts.append(torch.tensor([eos], dtype=torch.int32))
    return TokenStream(torch.cat(parts), characters, utf8_bytes)
