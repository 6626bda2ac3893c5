from __future__ import annotations

from collections.abc import Sequence

from llmos.engine.detokenize import IncrementalText

PIECES = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "!", 6: "\ufffd", 7: "é"}


def decode(ids: Sequence[int]) -> str:
    text = "".join(PIECES[i] for i in ids)
    return text.replace("\ufffdé", "é")  # token 6+7 form one character


def run(ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], IncrementalText]:
    t = IncrementalText(decode, stop)
    out = []
    for i in ids:
        out.append(t.push(i))
        if t.stopped:
            break
    out.append(t.flush())
    return out, t


def test_text_streams_piece_by_piece() -> None:
    out, _ = run([1, 2, 3, 4])
    assert "".join(out) == "Hello world"
    assert out[:4] == ["Hel", "lo", " wor", "ld"]


def test_stop_sequence_spanning_tokens_is_cut_and_never_emitted() -> None:
    out, t = run([1, 2, 3, 4, 5], stop=("lo w",))
    assert t.stopped
    assert "".join(out) == "Hel"


def test_possible_stop_prefix_is_held_back_then_released() -> None:
    t = IncrementalText(decode, ("lo!",))
    assert t.push(1) == "He"  # the "l" may start "lo!"
    assert t.push(2) == "l"  # "lo" may still become "lo!"
    assert t.push(3) == "lo wor"  # it did not
    assert not t.stopped


def test_incomplete_utf8_is_held_back() -> None:
    t = IncrementalText(decode)
    assert t.push(6) == ""
    assert t.push(7) == "é"
