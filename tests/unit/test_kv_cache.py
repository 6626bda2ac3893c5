"""Key/value cache layers that grow in place: same states as transformers' own, no copy per step,
and a tensor handed to the cache is never written into."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from llmos.engine.torch_backend.attention import WIDTH_BLOCK, block_width
from llmos.engine.torch_backend.kv_cache import GrowingLayer, new_cache


def _states(length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, length, 4, generator=g), torch.randn(2, 3, length, 4, generator=g)


def test_appends_reuse_the_buffer_and_match_concatenation() -> None:
    layer = GrowingLayer()
    keys, values = _states(5, 0)
    layer.update(keys, values)
    buffer = layer._keys.buffer
    for step in range(10):
        k, v = _states(1, step + 1)
        keys, values = torch.cat([keys, k], 2), torch.cat([values, v], 2)
        got_k, got_v = layer.update(k, v)
        assert torch.equal(got_k, keys) and torch.equal(got_v, values)
    assert layer._keys.buffer is buffer  # 5 + 10 tokens fit the room left at the first allocation
    assert layer.get_seq_length() == 15


def test_assigned_tensors_are_never_written_into() -> None:
    layer = GrowingLayer()
    shared_k, shared_v = _states(6, 1)
    before = shared_k.clone(), shared_v.clone()
    layer.keys, layer.values = shared_k[:, :, 2:], shared_v[:, :, 2:]  # e.g. trimmed left padding
    k, v = _states(1, 2)
    got_k, got_v = layer.update(k, v)
    assert torch.equal(shared_k, before[0]) and torch.equal(shared_v, before[1])
    assert torch.equal(got_k, torch.cat([before[0][:, :, 2:], k], 2))
    assert torch.equal(got_v, torch.cat([before[1][:, :, 2:], v], 2))


def test_keys_and_values_are_assigned_independently() -> None:
    layer = GrowingLayer()
    layer.update(*_states(6, 3))
    keys, values = layer.keys, layer.values
    assert keys is not None and values is not None
    layer.keys = keys[:, :, 2:]  # batch_state trims keys, then values
    assert layer.values is not None and torch.equal(layer.values, values)
    layer.values = values[:, :, 2:]
    assert layer.get_seq_length() == 4


def test_a_model_decodes_the_same_as_with_transformers_cache(tiny_chat_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    logits = []
    for cache in (DynamicCache(config=model.config), new_cache(model.config)):
        out = model(input_ids=prompt, cache=cache, use_cache=True)
        steps = []
        for i in range(6):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(input_ids=token, cache=cache, use_cache=True, position_ids=torch.tensor([[7 + i]]))
            steps.append(out.logits)
        logits.append(torch.cat(steps))
    assert torch.allclose(logits[0], logits[1], atol=1e-6)


def test_the_room_past_the_filled_positions_holds_attentions_block_of_zeros(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode step reads the filled positions rounded up to attention's block and masks the rest:
    the buffers keep that room, and it holds zeros, never memory left as it was found (a masked
    product multiplies it by a probability of zero, which a NaN would survive)."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))  # stale memory
    layer = GrowingLayer()
    layer.update(*_states(5, 0))
    for step in range(2 * WIDTH_BLOCK):
        layer.update(*_states(1, step + 1))
        filled, width = 6 + step, block_width(6 + step)
        keys, values = layer.read(width)
        assert keys.shape[2] == values.shape[2] == width
        assert torch.equal(keys[:, :, :filled], layer.keys) and torch.equal(values[:, :, :filled], layer.values)
        assert torch.equal(keys[:, :, filled:], torch.zeros_like(keys[:, :, filled:]))
        assert torch.equal(values[:, :, filled:], torch.zeros_like(values[:, :, filled:]))


def test_a_limited_buffer_is_read_only_as_far_as_its_limit() -> None:
    layer = GrowingLayer()
    layer._keys.limit = layer._values.limit = 20  # limit_growth
    layer.update(*_states(1, 0))
    buffer = layer._keys.buffer
    for step in range(17):
        layer.update(*_states(1, step + 1))
    keys, values = layer.read(block_width(18))
    assert block_width(18) > 20 and keys.shape[2] == values.shape[2] == 20
    assert layer._keys.buffer is buffer  # never grown again for a block it may not hold


def test_rows_leaving_keep_the_spare_room() -> None:
    """Selecting rows (those still decoding) copies them once, with the buffer's room: the next
    step appends in place instead of copying the selected cache again."""
    layer = GrowingLayer()
    keys, values = _states(5, 0)
    layer.update(keys, values)
    layer.batch_select_indices(torch.tensor([1]))
    buffer = layer._keys.buffer
    k, v = _states(1, 1)
    got_k, got_v = layer.update(k[1:], v[1:])
    assert layer._keys.buffer is buffer
    assert torch.equal(got_k, torch.cat([keys[1:], k[1:]], 2)) and torch.equal(got_v, torch.cat([values[1:], v[1:]], 2))
