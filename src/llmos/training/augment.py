"""EDA data augmentation for text classification (Wei & Zou, 2019): each training example gets
extra copies in which words are replaced by a near synonym, deleted, or swapped with another.

Synonyms come from the model itself: the nearest whole-word tokens (cosine similarity) in its
input-embedding matrix. This machine has no internet, so WordNet (EDA's source) cannot be
downloaded, and the model's own neighbourhood is what it already treats as similar. Neighbours
in an embedding space can be related words that are not synonyms (sometimes antonyms, which
share contexts), which is why each word is touched only with a small probability.
Deterministic for a given seed, so a resumed job trains on the very same data.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")
_WORD = re.compile(r"^[a-z]{3,}$")


def embedding_synonyms(words: set[str], tokenizer: object, embeddings: torch.Tensor) -> dict[str, str]:
    """For each word that is one token of the vocabulary, its nearest other whole-word token."""
    vocab: dict[str, int] = tokenizer.get_vocab()  # type: ignore[attr-defined]
    candidates = sorted((token, i) for token, i in vocab.items() if _WORD.match(token))
    if not candidates:
        return {}
    ids = torch.tensor([i for _, i in candidates])
    space = torch.nn.functional.normalize(embeddings[ids].float(), dim=-1)
    known = sorted(w for w in words if w in vocab and _WORD.match(w))
    out: dict[str, str] = {}
    for k in range(0, len(known), 512):
        chunk = known[k : k + 512]
        query = torch.nn.functional.normalize(embeddings[torch.tensor([vocab[w] for w in chunk])].float(), dim=-1)
        scores = query @ space.T
        for row, word in enumerate(chunk):
            best = scores[row].topk(2).indices.tolist()
            out[word] = next(candidates[j][0] for j in best if candidates[j][0] != word)
    return out


def eda(text: str, synonyms: dict[str, str], probability: float, rng: random.Random) -> str:
    """One variant of ``text``: each word, with ``probability``, replaced, deleted or swapped."""
    words = text.split()
    out = list(words)
    for i, word in enumerate(words):
        if rng.random() >= probability:
            continue
        operation = rng.choice(("synonym", "delete", "swap"))
        if operation == "synonym" and word.lower() in synonyms:
            out[i] = synonyms[word.lower()]
        elif operation == "delete" and len(words) > 1:
            out[i] = ""
        elif operation == "swap" and len(words) > 1:
            j = rng.randrange(len(words))
            out[i], out[j] = out[j], out[i]
    return " ".join(w for w in out if w) or text


def augment(
    examples: Sequence[T],
    text_of: Callable[[T], str],
    with_text: Callable[[T, str], T],
    synonyms: dict[str, str],
    *,
    probability: float,
    copies: int,
    seed: int,
) -> list[T]:
    """The examples followed by ``copies`` variants of each that differ from it (same label)."""
    rng = random.Random(seed)  # noqa: S311 -- data augmentation, not secrets
    variants = []
    for example in examples:
        text = text_of(example)
        for _ in range(copies):
            changed = eda(text, synonyms, probability, rng)
            if changed != text:
                variants.append(with_text(example, changed))
    return [*examples, *variants]
