"""Sequence classification with a fine-tuned encoder: labels with softmax scores."""

from __future__ import annotations

import threading
from typing import Any

import torch

from llmos.engine.protocol import ClassificationResult, PairScores
from llmos.engine.threads import encoder_compute
from llmos.errors import ContextLengthExceededError


class HeadRunner:
    """A fine-tuned encoder with a task head (its labels in ``id2label``). One forward pass per
    micro-batch; a lock keeps the 2-core CPU from thrashing."""

    def __init__(self, model: Any, tokenizer: Any, *, max_length: int, micro_batch: int = 64) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.micro_batch = micro_batch
        self.labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
        self._lock = threading.Lock()

    def close(self) -> None:
        """Nothing runs in the background; dropping references frees the weights."""

    def probabilities(self, batch: Any) -> torch.Tensor:
        """Softmax over the labels for each position of a tokenised batch, on the encoder compute thread."""

        @torch.inference_mode()
        def forward() -> torch.Tensor:
            return torch.softmax(self.model(**batch).logits.float(), dim=-1)

        return encoder_compute.run(forward)


class ClassifierRunner(HeadRunner):
    def classify(self, texts: list[str]) -> ClassificationResult:
        prompt_tokens = count_tokens(self.tokenizer, texts, self.max_length)
        scores: list[list[float]] = []
        with self._lock:
            for k in range(0, len(texts), self.micro_batch):
                batch = self.tokenizer(texts[k : k + self.micro_batch], padding=True, return_tensors="pt")
                scores.extend(self.probabilities(batch).tolist())
        return ClassificationResult(labels=self.labels, scores=scores, prompt_tokens=prompt_tokens)

    def score_pairs(self, pairs: list[tuple[str, str]], *, truncate: bool = False) -> PairScores:
        """A cross-encoder's relevance of each (query, document) pair, read together as one input:
        the sigmoid of a one-label head's logit (as sentence-transformers' ``CrossEncoder``), else
        the probability of label 1 (the relevant class of a two-label head). With ``truncate`` a
        document is cut to what fits beside its query (as ``CrossEncoder`` does); a query alone
        too long is still refused."""
        cut = {"truncation": "only_second", "max_length": self.max_length} if truncate else {}
        prompt_tokens = 0
        for i, (query, document) in enumerate(pairs):
            n = len(self.tokenizer(query, document)["input_ids"])
            if truncate and n > self.max_length:
                frame = self.tokenizer.num_special_tokens_to_add(pair=True)
                query_alone = len(self.tokenizer(query, add_special_tokens=False)["input_ids"]) + frame
                n = self.max_length if query_alone < self.max_length else n  # else no cut of the document fits
            if n > self.max_length:
                raise ContextLengthExceededError(
                    f"pair {i} has {n} tokens; this model accepts at most {self.max_length}", param="documents"
                )
            prompt_tokens += n
        scores: list[float] = []
        with self._lock:
            for k in range(0, len(pairs), self.micro_batch):
                part = pairs[k : k + self.micro_batch]
                batch = self.tokenizer(
                    [q for q, _ in part], [d for _, d in part], padding=True, return_tensors="pt", **cut
                )
                scores.extend(self.relevance(batch).tolist())
        return PairScores(scores=scores, prompt_tokens=prompt_tokens)

    def relevance(self, batch: Any) -> torch.Tensor:
        @torch.inference_mode()
        def forward() -> torch.Tensor:
            logits = self.model(**batch).logits.float()
            return torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, dim=-1)[:, 1]

        return encoder_compute.run(forward)


def count_tokens(tokenizer: Any, texts: list[str], max_length: int) -> int:
    """Tokens in all ``texts`` (special tokens included); 400 naming the first input that is too long."""
    total = 0
    for i, text in enumerate(texts):
        n = len(tokenizer(text, add_special_tokens=True)["input_ids"])
        if n > max_length:
            raise ContextLengthExceededError(
                f"input[{i}] has {n} tokens; this model accepts at most {max_length}", param="input"
            )
        total += n
    return total
