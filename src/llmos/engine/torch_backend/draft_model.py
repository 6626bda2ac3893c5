"""A small model of the target's family that drafts a single stream's next tokens.

Prompt lookup drafts only where the answer copies its context; a draft model proposes tokens
anywhere, at the cost of its own decode steps. The draft model keeps one cache, for the row
being speculated, holding the tokens it has read: each call rolls it back to what the row's
tokens still share with it (a rejected draft's tail, or another request's whole history past a
common system prompt), reads the rest in one pass, and then decodes one token a step: greedily
for a greedy row, and for a sampled row by drawing from its own distribution at the row's
temperature and top-p, returning those distributions for the verify's rule.
A new prompt is read ``CATCH_UP_TOKENS`` a call, proposing nothing until it is all read, so that
no engine step stalls on a long prompt's prefill (a request arriving meanwhile waits one such
pass at most).
Greedy rows stay exact, and each sampled row keeps its own distribution (``speculative.accept``:
a sampled draft token ``x`` is accepted with probability ``min(1, p(x) / q(x))``). Its steps run the lean layers,
so a draft token costs about its weights' bytes read (decode on a CPU is bound by memory
bandwidth): ``cost``, a fraction of the target's step, enters ``auto``'s rule (docs/adr/0027).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from llmos.engine.sampling import draw_one, sampling_probs
from llmos.engine.torch_backend.kv_cache import limit_growth, new_cache, truncate
from llmos.engine.torch_backend.lean_decode import LeanDecoder
from llmos.errors import ModelLoadError

CATCH_UP_TOKENS = 64
"""Most tokens the draft model reads in one call while catching up with a row (a new prompt)."""


def same_tokenizer(target: Any, draft: Any) -> bool:
    """Whether every token id means the same text to both tokenizers (drafts are token ids)."""
    return bool(len(target) == len(draft) and target.get_vocab() == draft.get_vocab())


def weight_bytes(model: Any) -> int:
    """Bytes a decode step reads: every parameter once (a tied embedding and output layer once),
    but for an input embedding of its own only its rows looked up, next to nothing."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    if embedding is not model.get_output_embeddings().weight:
        total -= embedding.numel() * embedding.element_size()
    return total


class DraftModel:
    """``propose(tokens, count, ...)``: the draft model's ``count`` next tokens after ``tokens``."""

    def __init__(self, model: Any, *, name: str, target: Any, positions: int) -> None:
        """``positions``: the most its cache holds (the target's context)."""
        decoder = LeanDecoder.build(model, int8=False, native=False)
        if decoder is None:
            raise ModelLoadError(
                f"draft model {name} is not an architecture the lean decode step serves (Llama or Qwen2 "
                "without extra biases or sliding windows), so it cannot draft (draft_models)"
            )
        decoder.fuser = None  # no adapters: never a background rebuild of its matrices
        self.name = name
        self.model = model
        self.decoder = decoder
        own = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self.context_length = min(own, positions) if own else positions
        self.vocab = int(target.config.vocab_size)
        self.cost = weight_bytes(model) / weight_bytes(target)
        """A draft token's cost in the target's decode steps, by the weight bytes each reads."""
        self._cache = self._new_cache()
        self._read: list[int] = []  # the tokens whose states the cache holds, in order

    def _new_cache(self) -> Any:
        cache = new_cache(self.model.config)
        limit_growth(cache, self.context_length)  # its spare room never past what a row can take
        return cache

    def fits(self, length: int, count: int) -> bool:
        """Whether ``count`` drafts after ``length`` tokens stay within the draft model's context."""
        return not self.context_length or length + count <= self.context_length

    @torch.inference_mode()
    def propose(
        self,
        tokens: list[int],
        count: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        arrived: Callable[[], bool] | None = None,
    ) -> tuple[list[int], torch.Tensor | None]:
        """The draft, and None where it is greedy (``temperature`` 0); sampled, the distributions
        each token was drawn from, (len(draft), the target's vocabulary). Empty while it is still
        reading ``tokens`` (a new prompt, ``CATCH_UP_TOKENS`` a call). Shorter than ``count`` once
        ``arrived()`` (asked before each further token) says a request came in: its first token
        waits for one of the draft model's steps then, not for a whole draft."""
        if not tokens or count < 1:
            return [], None
        shared = 0
        limit = min(len(self._read), len(tokens) - 1)  # the last token is read again: its logits are wanted
        while shared < limit and self._read[shared] == tokens[shared]:
            shared += 1
        if shared:
            truncate(self._cache, shared)
        else:  # nothing in common: a new cache, the old one's memory freed
            self._cache = self._new_cache()
        chunk = tokens[shared : shared + CATCH_UP_TOKENS]
        logits = self.decoder.prefill([(chunk, shared, self._cache)])[-1]
        self._read = list(tokens[: shared + len(chunk)])
        if len(self._read) < len(tokens):
            return [], None
        choose = _Chooser(self.vocab, temperature, top_p, generator)
        draft = [choose(logits)]
        attention = torch.ones((1, len(tokens) + count), dtype=torch.long)
        for position in range(len(tokens), len(tokens) + count - 1):
            if arrived is not None and arrived():
                break
            step = self.decoder(
                torch.tensor([draft[-1]]), torch.tensor([position]), attention[:, : position + 1], self._cache, None
            )
            self._read.append(draft[-1])
            draft.append(choose(step[0]))
        return draft, torch.stack(choose.drawn_from) if choose.drawn_from else None


class _Chooser:
    """Chooses each draft token from the draft model's logits as the row chooses its own: the
    argmax, or a draw at its temperature and top-p, keeping the distributions drawn from."""

    def __init__(self, vocab: int, temperature: float, top_p: float, generator: torch.Generator | None) -> None:
        self.vocab = vocab
        self.greedy = temperature == 0
        self.temperature = torch.tensor([temperature])
        self.top_p = torch.tensor([top_p])
        self.generator = generator
        self.drawn_from: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor) -> int:
        logits = logits[: self.vocab]  # the target's vocabulary: ids past it are the output layer's padding
        if self.greedy:
            return int(logits.argmax())
        if logits.shape[0] < self.vocab:  # a narrower output layer: the ids it lacks are never drawn
            logits = torch.nn.functional.pad(logits, (0, self.vocab - logits.shape[0]), value=-torch.inf)
        probs = sampling_probs(logits[None].float(), self.temperature, self.top_p)[0]
        self.drawn_from.append(probs)
        return draw_one(probs, self.generator)
