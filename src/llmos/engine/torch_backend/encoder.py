"""Sentence embeddings from an encoder, pooled as the model's sentence-transformers config says."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from llmos.engine.protocol import EmbeddingResult
from llmos.engine.threads import encoder_compute
from llmos.errors import ContextLengthExceededError


@dataclass(frozen=True)
class Pooling:
    mode: str = "mean"  # mean | cls | max
    normalize: bool = True

    @classmethod
    def from_model_dir(cls, root: Path) -> Pooling:
        """Read ``modules.json`` and the pooling module's config; mean + normalise when absent."""
        modules_file = root / "modules.json"
        if not modules_file.is_file():
            return cls()
        modules = json.loads(modules_file.read_text())
        normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
        mode = "mean"
        for m in modules:
            if m.get("type", "").endswith("Pooling"):
                cfg_file = root / m.get("path", "") / "config.json"
                cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
                if cfg.get("pooling_mode_cls_token"):
                    mode = "cls"
                elif cfg.get("pooling_mode_max_tokens"):
                    mode = "max"
        return cls(mode=mode, normalize=normalize)


@dataclass
class _Waiting:
    ids: list[list[int]]
    vectors: list[list[float]] | None = None
    error: BaseException | None = None


class EncoderRunner:
    """Embeds the inputs of concurrent requests together (flat combining).

    A request queues its token ids, then takes the model lock; whoever holds it embeds every
    request queued so far in one go, sorted by length into micro-batches (little padding), and
    hands each its vectors; the forward passes run on the encoder compute thread (see
    ``threads``). Under load, many one-text requests become one forward pass instead of a
    forward each; alone, a request runs at once. One forward at a time also keeps a 2-core
    CPU from thrashing.
    """

    def __init__(self, model: Any, tokenizer: Any, pooling: Pooling, *, max_length: int, micro_batch: int = 64) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length
        self.micro_batch = micro_batch
        self._lock = threading.Lock()  # the model: one combined forward at a time
        self._queue_lock = threading.Lock()
        self._queue: list[_Waiting] = []
        self.forwards = 0  # forward passes run, for operators and tests

    def close(self) -> None:
        """Nothing runs in the background; dropping references frees the weights."""

    def embed(self, inputs: list[str] | list[list[int]]) -> EmbeddingResult:
        items: list[str | list[int]] = list(inputs)
        mine = _Waiting([self._ids(x, i) for i, x in enumerate(items)])
        with self._queue_lock:
            self._queue.append(mine)
        with self._lock:
            if mine.vectors is None and mine.error is None:  # nobody embedded it while we waited
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                encoder_compute.run(partial(self._embed_all, batch))
        if mine.error is not None:
            raise mine.error
        assert mine.vectors is not None
        return EmbeddingResult(vectors=mine.vectors, prompt_tokens=sum(len(x) for x in mine.ids))

    def _embed_all(self, waiting: list[_Waiting]) -> None:
        flat = [(w, i) for w in waiting for i in range(len(w.ids))]
        order = sorted(range(len(flat)), key=lambda k: len(flat[k][0].ids[flat[k][1]]))
        for w in waiting:
            w.vectors = [[] for _ in w.ids]
        try:
            for start in range(0, len(order), self.micro_batch):
                chunk = order[start : start + self.micro_batch]
                pooled = self._forward([flat[k][0].ids[flat[k][1]] for k in chunk]).tolist()
                self.forwards += 1
                for k, vector in zip(chunk, pooled, strict=True):
                    w, i = flat[k]
                    assert w.vectors is not None
                    w.vectors[i] = vector
        except Exception as exc:  # every request of this combined batch learns why
            for w in waiting:
                w.vectors, w.error = None, exc

    def _ids(self, item: str | list[int], position: int) -> list[int]:
        if isinstance(item, str):
            ids = list(self.tokenizer(item, add_special_tokens=True)["input_ids"])
        else:
            ids = [self.tokenizer.cls_token_id, *item, self.tokenizer.sep_token_id]
        if len(ids) > self.max_length:
            raise ContextLengthExceededError(
                f"input[{position}] has {len(ids)} tokens; this model accepts at most {self.max_length}", param="input"
            )
        return ids

    @torch.inference_mode()
    def _forward(self, batch: list[list[int]]) -> torch.Tensor:
        width = max(len(x) for x in batch)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in batch])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch])
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
        return pool(hidden, mask, self.pooling)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Sentence vectors from token states (padding masked out), as ``pooling`` says; the one
    pooling the engine serves and the ONNX export (``llmos.export``) traces."""
    if pooling.mode == "cls":
        pooled = hidden[:, 0]
    elif pooling.mode == "max":
        pooled = hidden.masked_fill(~mask.bool()[..., None], float("-inf")).amax(dim=1)
    else:
        weights = mask[..., None].to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    if pooling.normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
    return pooled
