"""Sequence classification with a fine-tuned encoder: labels with softmax scores."""

from __future__ import annotations

import threading
from collections.abc import Callable
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

    def encoded(
        self, count: int, encode: Callable[[slice], Any], too_long: Callable[[int, int], str], *, param: str
    ) -> tuple[list[Any], int]:
        """``count`` inputs tokenised once each, a micro-batch at a time (``encode`` of a slice of
        them: padded tensors with their attention mask), and their tokens in all. The first input
        longer than ``max_length`` is refused (``too_long(i, n)``, naming ``param``) before any
        forward pass runs, from the same tokens the passes then read."""
        batches, total = [], 0
        for k in range(0, count, self.micro_batch):
            batch = encode(slice(k, k + self.micro_batch))
            for j, n in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
                if n > self.max_length:
                    raise ContextLengthExceededError(too_long(k + j, n), param=param)
                total += n
            batches.append(batch)
        return batches, total

    def texts_encoded(self, texts: list[str], **options: Any) -> tuple[list[Any], int]:
        """``texts`` as micro-batches (``options`` passed to the tokenizer), each text tokenised once."""
        return self.encoded(
            len(texts),
            lambda part: self.tokenizer(
                texts[part], padding=True, return_attention_mask=True, return_tensors="pt", **options
            ),
            lambda i, n: f"input[{i}] has {n} tokens; this model accepts at most {self.max_length}",
            param="input",
        )


class ClassifierRunner(HeadRunner):
    def classify(self, texts: list[str]) -> ClassificationResult:
        batches, prompt_tokens = self.texts_encoded(texts)
        with self._lock:
            scores = [row for batch in batches for row in self.probabilities(batch).tolist()]
        return ClassificationResult(labels=self.labels, scores=scores, prompt_tokens=prompt_tokens)

    def score_pairs(self, pairs: list[tuple[str, str]], *, truncate: bool = False) -> PairScores:
        """A cross-encoder's relevance of each (query, document) pair, read together as one input:
        the sigmoid of a one-label head's logit (as sentence-transformers' ``CrossEncoder``), else
        the probability of label 1 (the relevant class of a two-label head). With ``truncate`` a
        document is cut to what fits beside its query (as ``CrossEncoder`` does); a query that
        leaves its document no room is still refused. Each pair is tokenised once."""
        queries, documents = [q for q, _ in pairs], [d for _, d in pairs]
        cut: dict[str, Any] = {}
        if truncate:
            self._check_queries_leave_room(queries)
            cut = {"truncation": "only_second", "max_length": self.max_length}
        batches, prompt_tokens = self.encoded(
            len(pairs),
            lambda part: self.tokenizer(
                queries[part], documents[part], padding=True, return_attention_mask=True, return_tensors="pt", **cut
            ),
            lambda i, n: f"pair {i} has {n} tokens; this model accepts at most {self.max_length}",
            param="documents",
        )
        with self._lock:
            scores = [score for batch in batches for score in self.relevance(batch).tolist()]
        return PairScores(scores=scores, prompt_tokens=prompt_tokens)

    def _check_queries_leave_room(self, queries: list[str]) -> None:
        """Refuse a pair whose query, with the pair's special tokens, leaves no token for its
        document (no cut of the document could fit; the tokenizer would raise). Each distinct
        query is tokenised alone once: a search sends one query with many documents."""
        frame = self.tokenizer.num_special_tokens_to_add(pair=True)
        sizes: dict[str, int] = {}
        for i, query in enumerate(queries):
            if query not in sizes:
                sizes[query] = len(self.tokenizer(query, add_special_tokens=False)["input_ids"]) + frame
            if sizes[query] >= self.max_length:
                raise ContextLengthExceededError(
                    f"pair {i}'s query takes {sizes[query]} tokens with the pair's special tokens; this model "
                    f"accepts at most {self.max_length} in all, so no part of its document fits",
                    param="documents",
                )

    def relevance(self, batch: Any) -> torch.Tensor:
        @torch.inference_mode()
        def forward() -> torch.Tensor:
            logits = self.model(**batch).logits.float()
            return torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, dim=-1)[:, 1]

        return encoder_compute.run(forward)
