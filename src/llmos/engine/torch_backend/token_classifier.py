"""Named-entity recognition with a fine-tuned token-classification encoder.

Each word is tagged by its first sub-word (as it was trained, see training.ner); consecutive
words of one type form an entity under the BIO rules conlleval uses (an ``I-`` tag that does
not continue an entity of its type starts one; ``E-``/``S-`` of BIOES close one; a tag with no
prefix is its own type). Offsets come from the fast tokenizer, so ``input[start:end]`` is the
entity's text exactly as the caller wrote it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmos.engine.protocol import Entity, EntityResult
from llmos.engine.torch_backend.classifier import HeadRunner

OUTSIDE = "O"


@dataclass(frozen=True)
class TaggedWord:
    tag: str
    score: float
    start: int
    end: int


def split_tag(tag: str) -> tuple[str, str | None]:
    """``B-PER`` -> (``B``, ``PER``); ``O`` -> (``O``, None); ``PER`` -> (``I``, ``PER``)."""
    if tag == OUTSIDE or not tag:
        return OUTSIDE, None
    if len(tag) > 2 and tag[0] in "BIES" and tag[1] in "-_":
        return tag[0], tag[2:]
    return "I", tag


def group_entities(text: str, words: Sequence[TaggedWord]) -> list[Entity]:
    """Entities from word tags in text order; an entity's score is the mean of its words' scores."""
    entities: list[Entity] = []
    kind: str | None = None
    span: list[TaggedWord] = []

    def close() -> None:
        nonlocal kind, span
        if kind is not None and span:
            start, end = span[0].start, span[-1].end
            score = sum(w.score for w in span) / len(span)
            entities.append(Entity(entity=kind, text=text[start:end], start=start, end=end, score=score))
        kind, span = None, []

    for word in words:
        prefix, word_kind = split_tag(word.tag)
        if word_kind is None:
            close()
            continue
        if prefix in "BS" or word_kind != kind:
            close()
            kind = word_kind
        span.append(word)
        if prefix in "ES":
            close()
    close()
    return entities


def tag_words(
    word_ids: Sequence[int | None], offsets: Sequence[Sequence[int]], tags: Sequence[str], scores: Sequence[float]
) -> list[TaggedWord]:
    """One entry per word: the tag and score of its first sub-word, the span of all of them."""
    words: list[TaggedWord] = []
    previous: int | None = None
    for position, word in enumerate(word_ids):
        if word is None:
            continue
        start, end = offsets[position]
        if word != previous:
            words.append(TaggedWord(tags[position], scores[position], start, end))
        else:
            first = words[-1]
            words[-1] = TaggedWord(first.tag, first.score, first.start, max(first.end, end))
        previous = word
    return words


class TokenClassifierRunner(HeadRunner):
    def __init__(self, model: Any, tokenizer: Any, *, max_length: int, micro_batch: int = 32) -> None:
        if not tokenizer.is_fast:
            raise ValueError("NER needs a fast tokenizer (tokenizer.json) for character offsets")
        super().__init__(model, tokenizer, max_length=max_length, micro_batch=micro_batch)

    def extract(self, texts: list[str]) -> EntityResult:
        batches, prompt_tokens = self.texts_encoded(texts, return_offsets_mapping=True)
        found: list[list[Entity]] = []
        with self._lock:
            for k, enc in zip(range(0, len(texts), self.micro_batch), batches, strict=True):
                chunk = texts[k : k + self.micro_batch]
                offsets = enc.pop("offset_mapping").tolist()
                scores, best = self.probabilities(enc).max(dim=-1)
                for i, text in enumerate(chunk):
                    tags = [self.labels[j] for j in best[i].tolist()]
                    found.append(group_entities(text, tag_words(enc.word_ids(i), offsets[i], tags, scores[i].tolist())))
        return EntityResult(entities=found, prompt_tokens=prompt_tokens)
