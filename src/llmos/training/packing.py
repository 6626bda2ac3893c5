"""Sequence packing for chat fine-tuning: short conversations share one row.

Examples are placed first-fit in decreasing length order into rows of at most
``max_seq_length`` tokens. Each keeps its own positions (restarting at 0), and the model is run
with position ids and no 2-D attention mask, from which transformers builds a block-diagonal
causal mask: a token attends only to earlier tokens of its own conversation, so a packed row
computes exactly what its conversations would alone, with none of the padding a batch of
uneven lengths carries. A conversation's first token is never an assistant token, so no label
asks one conversation to predict the next.
"""

from __future__ import annotations

from llmos.training.chat_data import Example


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Rows of whole examples, each at most ``max_length`` tokens (longer examples stay alone)."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: len(e.input_ids), reverse=True):
        size = len(example.input_ids)
        for i, left in enumerate(room):
            if size <= left:
                rows[i].append(example)
                room[i] -= size
                break
        else:
            rows.append([example])
            room.append(max_length - size)
    return [_join(row) for row in rows]


def _join(row: list[Example]) -> Example:
    return Example(
        input_ids=[t for e in row for t in e.input_ids],
        labels=[t for e in row for t in e.labels],
        position_ids=[p for e in row for p in range(len(e.input_ids))],
    )
