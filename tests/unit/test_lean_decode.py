"""The lean decode step computes what the model's own forward computes: same logits and the same
cache, for left-padded batches with rows at different positions, with LoRA adapters mixed in; its
int8 copies stay close to the bf16 weights and are used only for small batches. Its prefill of a
prompt's chunks computes what the model's forward computes too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from llmos.engine.torch_backend import attention, lean_decode, packed, speculative
from llmos.engine.torch_backend.attention import SDPA_MAX_POSITIONS, WIDTH_BLOCK, block_width
from llmos.engine.torch_backend.int8 import INT8_MAX_ROWS, Int8Matrix, int8_supported
from llmos.engine.torch_backend.kv_cache import new_cache
from llmos.engine.torch_backend.lean_decode import LeanDecoder
from llmos.engine.torch_backend.lora import LoraWeights
from llmos.engine.torch_backend.lora_bank import EMPTY_VIEW, BankView, LoraBank, _zero_b
from llmos.engine.torch_backend.lora_expand import LoraExpand
from llmos.engine.torch_backend.lora_groups import SHRINK_AFTER
from llmos.engine.torch_backend.packed import Matrix, PackedMatrix


def _model(tiny_chat_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=dtype).eval()


@pytest.fixture(params=["llama", "qwen2"])
def tiny_decoder_dir(request: pytest.FixtureRequest) -> Path:
    """A tiny model of each architecture the lean step reproduces (Qwen2: Llama with q/k/v biases)."""
    return Path(request.getfixturevalue("tiny_chat_dir" if request.param == "llama" else "tiny_qwen2_dir"))


def _padded_batch(model: torch.nn.Module, lengths: list[int], seed: int) -> tuple[object, torch.Tensor, torch.Tensor]:
    """Two identical caches of a left-padded prefill, its attention mask and each row's next position."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, model.config.vocab_size, (len(lengths), width), generator=g)
    attention = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        attention[row, width - n :] = 1
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    caches = []
    for _ in range(2):
        cache = new_cache(model.config)
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=attention, position_ids=positions, cache=cache)
        caches.append(cache)
    return caches, attention, torch.tensor(lengths)


def _decode_both(
    model: torch.nn.Module, decoder: LeanDecoder, lora: LoraBank, lengths: list[int], steps: int, float32_tolerance=1e-5
) -> None:
    """Decode ``steps`` tokens with both paths from the same prefill; every step must agree."""
    (reference, lean), attention, positions = _padded_batch(model, lengths, seed=len(lengths))
    tokens = torch.arange(3, 3 + len(lengths))
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    # One row over a short cache: the same kernels as the model's forward, bit for bit.
    exact = bf16 and len(lengths) == 1 and lengths[0] + steps <= SDPA_MAX_POSITIONS
    tolerance = 3e-2 if bf16 else float32_tolerance
    for _ in range(steps):
        attention = torch.cat([attention, torch.ones((len(lengths), 1), dtype=torch.long)], 1)
        with torch.inference_mode():
            want = (
                model(
                    input_ids=tokens[:, None],
                    attention_mask=attention,
                    position_ids=positions[:, None],
                    cache=reference,
                    use_cache=True,
                )
                .logits[:, -1]
                .float()
            )
            got = decoder(tokens, positions, attention, lean, lora.context)
        if exact:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
        for mine, theirs in zip(lean.layers, reference.layers, strict=True):
            torch.testing.assert_close(mine.keys, theirs.keys, rtol=tolerance, atol=tolerance)
            torch.testing.assert_close(mine.values, theirs.values, rtol=tolerance, atol=tolerance)
        tokens, positions = want.argmax(-1), positions + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_step_equals_the_models_forward(tiny_decoder_dir: Path, dtype: torch.dtype) -> None:
    model = _model(tiny_decoder_dir, dtype)
    decoder = LeanDecoder.build(model, int8=False)
    assert decoder is not None
    lora = LoraBank(model, 1 << 20)
    _decode_both(model, decoder, lora, [5], steps=6)  # one row, no padding: no mask at all
    _decode_both(model, decoder, lora, [3, 9, 6], steps=6)  # left padding, rows at their own positions
    _decode_both(model, decoder, lora, [SDPA_MAX_POSITIONS - 1], steps=3)  # one row past the SDPA length


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_reads_the_cache_in_whole_blocks(
    tiny_chat_dir: Path, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The grouped products see the cached width rounded up to a block, the same shape step after
    step until a block fills (oneDNN compiles a primitive per shape), and the positions past the
    filled ones are masked: the step still computes the model's forward. One row over a short
    cache (SDPA) reads exactly its positions."""
    widths: list[int] = []
    step_attention = attention.step_attention

    def recording(q: torch.Tensor, keys: torch.Tensor, *rest: object) -> torch.Tensor:
        widths.append(keys.shape[2])
        return step_attention(q, keys, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(attention, "step_attention", recording)
    model = _model(tiny_chat_dir, dtype)
    decoder = LeanDecoder.build(model, int8=False)
    assert decoder is not None
    lora = LoraBank(model, 1 << 20)
    layers = model.config.num_hidden_layers
    steps = WIDTH_BLOCK + 2
    for lengths in ([3, 9, 6], [9, 9]):  # rows with left padding, and without (only the block's tail masked)
        widths.clear()
        _decode_both(model, decoder, lora, lengths, steps=steps)  # from 10 cached positions past a block
        assert widths == [block_width(9 + step) for step in range(1, steps + 1) for _ in range(layers)]
        assert len(set(widths)) == 2  # one block filled, a second begun
    widths.clear()
    _decode_both(model, decoder, lora, [5], steps=3)
    assert widths == [5 + step for step in range(1, 4) for _ in range(layers)]


def _model_chunk(model: torch.nn.Module, prompt: list[int], start: int, end: int, cache: object) -> torch.Tensor:
    """The model's own forward over ``prompt[start:end]`` after the states in ``cache``: its last logits."""
    with torch.inference_mode():
        out = model(
            input_ids=torch.tensor([prompt[start:end]]),
            attention_mask=torch.ones((1, end), dtype=torch.long),
            position_ids=torch.arange(start, end)[None],
            cache=cache,
            use_cache=True,
        )
    return out.logits[:, -1].float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_prefill_equals_the_models_forward(tiny_decoder_dir: Path, dtype: torch.dtype) -> None:
    """A prompt prefilled in chunks (the first from an empty cache, the others after cached states)
    gives the model's logits and cache; the first chunk in bf16 bit for bit."""
    model = _model(tiny_decoder_dir, dtype)
    decoder = LeanDecoder.build(model, int8=False)
    assert decoder is not None
    prompt = torch.randint(3, model.config.vocab_size, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-5
    reference, lean = new_cache(model.config), new_cache(model.config)
    for start, end in [(0, 9), (9, 10), (10, 23)]:
        want = _model_chunk(model, prompt, start, end, reference)
        got = decoder.prefill([(prompt[start:end], start, lean)])
        if start == 0 and dtype == torch.bfloat16:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
        for mine, theirs in zip(lean.layers, reference.layers, strict=True):
            torch.testing.assert_close(mine.keys, theirs.keys, rtol=tolerance, atol=tolerance)
            torch.testing.assert_close(mine.values, theirs.values, rtol=tolerance, atol=tolerance)


def _lean(model: torch.nn.Module, *, native: bool = True) -> LeanDecoder:
    """A lean decoder whose adapters' ``A`` products run apart until ``refresh`` fuses them;
    ``native``: fused decode steps add the adapters' ``B`` products by the native kernel."""
    decoder = LeanDecoder.build(model, int8=False, native=native)
    assert decoder is not None
    assert (decoder.adapters.expand is not None) == native, "the native kernel did not build (is cc installed?)"
    decoder.fuser = None
    return decoder


@pytest.mark.parametrize(
    ("dtype", "adapters", "fused"),
    [
        (torch.float32, (None, None, None), False),
        (torch.bfloat16, (None, None, None), False),
        (torch.float32, ("a", None, "b"), False),  # mixed: each token its prompt's adapter columns
        (torch.float32, ("a", "a", "a"), False),  # one adapter: only its columns (bf16 adapters differ by rounding)
        (torch.float32, ("a", None, "b"), True),  # the A products in the base products
        (torch.float32, ("b", "b", "b"), True),
        (torch.float32, (None, None, None), True),  # no adapter in the pass, resident ones fused
    ],
)
def test_packed_prefill_gives_each_prompt_what_it_gets_alone(
    tiny_decoder_dir: Path, dtype: torch.dtype, adapters: tuple[str | None, ...], fused: bool
) -> None:
    """Chunks of several prompts in one pass, each after its own cached states (none, a prefix,
    a one-token chunk) and with its own LoRA adapter or none: each gets the logits and cache
    the model's forward (with the adapted modules) gives it alone."""
    model = _model(tiny_decoder_dir, dtype)
    decoder = _lean(model)
    lora = LoraBank(model, 1 << 20)
    for i, name in enumerate(("a", "b")):
        lora.acquire(name, lambda shapes, name=name, i=i: _random_adapter(shapes, name, 4, seed=i, dtype=dtype))
    if fused:
        decoder.refresh(lora.view)
        assert decoder.weights.covers(lora.view)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (11, 17, 6)]
    cached = [0, 9, 5]  # prompt tokens whose states are already in the cache
    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-5
    references, packed, chunks = [], [], []
    for prompt, done, adapter in zip(prompts, cached, adapters, strict=True):
        lora.prepare([adapter])
        caches = [new_cache(model.config), new_cache(model.config)]
        if done:
            for cache in caches:
                with torch.inference_mode():
                    model(input_ids=torch.tensor([prompt[:done]]), cache=cache, use_cache=True)
        want = _model_chunk(model, prompt, done, len(prompt), caches[0])
        references.append((want, caches[0]))
        packed.append(caches[1])
        chunks.append((prompt[done:], done, caches[1]))
    lora.prepare([a for (chunk, _, _), a in zip(chunks, adapters, strict=True) for _ in chunk])
    got = decoder.prefill(chunks, lora.context)
    assert got.shape == (3, model.config.vocab_size)
    for i, (want, reference) in enumerate(references):
        torch.testing.assert_close(got[i : i + 1], want, rtol=tolerance, atol=tolerance)
        for mine, theirs in zip(packed[i].layers, reference.layers, strict=True):
            torch.testing.assert_close(mine.keys, theirs.keys, rtol=tolerance, atol=tolerance)
            torch.testing.assert_close(mine.values, theirs.values, rtol=tolerance, atol=tolerance)


def _random_adapter(
    shapes: dict[str, tuple[int, int]], adapter_id: str, rank: int, seed: int, dtype: torch.dtype = torch.float32
) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name, (fan_in, fan_out) in shapes.items():
        a, b = torch.randn(rank, fan_in, generator=g) * 0.3, torch.randn(fan_out, rank, generator=g) * 0.3
        modules[name] = (a.to(dtype), b.to(dtype))
    return LoraWeights(adapter_id=adapter_id, modules=modules)


@pytest.mark.parametrize(("fused", "native"), [(False, False), (True, False), (True, True)])
def test_lean_step_applies_adapters_like_the_adapted_modules(tiny_decoder_dir: Path, fused: bool, native: bool) -> None:
    model = _model(tiny_decoder_dir, torch.float32)
    decoder = _lean(model, native=native)
    lora = LoraBank(model, 1 << 20)
    for i, name in enumerate(("a", "b", "c")):
        lora.acquire(name, lambda shapes, name=name, i=i: _random_adapter(shapes, name, 4, seed=i))
    if fused:
        decoder.refresh(lora.view)
    # The kernel, and the CPU's own float32 products (their blocking differs between AVX-512 and
    # AVX2 machines: up to 2e-5 apart here), sum each output's adapter terms in another order than
    # the modules' products; an adapter left out or applied twice is off by far more.
    tolerance = 1e-4

    def decode(lengths: list[int], steps: int) -> None:
        _decode_both(model, decoder, lora, lengths, steps, float32_tolerance=tolerance)

    lora.prepare(["a", "a"])  # one adapter for every row: only its columns are computed
    decode([4, 7], steps=4)
    lora.prepare(["a", None, "b", "c"])  # mixed batch: each row its own columns, the base row none
    decode([4, 7, 5, 3], steps=4)
    if native:  # the kernel reads each row's own columns: no copies of the adapters are built
        assert decoder.adapters.copy_bytes == 0
        lora.prepare(["c", None, "a"])
        decode([4, 7, 5], steps=2)
        lora.prepare([None, None])  # the base alone, with the resident adapters' A rows in its products
        decode([4, 7], steps=2)
        return
    every = decoder.adapters.columns  # the three adapters' 12 columns (of the bank's 16)
    assert every is not None and len(every) == 12
    lora.prepare(["c", None, "a"])  # two of the three: the columns built for all three are kept
    decode([4, 7, 5], steps=4)
    assert decoder.adapters.columns == every
    lora.prepare(["c", "c"])  # one of three: still the three's columns, until it has been so a while
    decode([4, 7], steps=4)
    assert decoder.adapters.columns == every
    for _ in range(SHRINK_AFTER):
        decoder.adapters.prepare(lora.context, 2, fused=fused, decode=True)
    start, end = lora.view.spans["c"]
    assert decoder.adapters.columns == tuple(range(start, end))  # groups over its columns only
    decode([4, 7], steps=2)
    kept = decoder.adapters._groups[0]["o"]
    assert kept is not None and kept.block is not None
    assert kept.block.inputs == 4 < lora.view.width
    assert decoder.adapters.copy_bytes > 0  # the blocks at least (one adapter's A and B are views)
    assert (kept.a is None) == fused  # fused: the base product computes every resident A
    lora.prepare([None, None])  # the base alone, with the resident adapters' A rows in its products
    decode([4, 7], steps=2)


def test_the_kernel_step_with_adapters_on_some_projections_only(tiny_chat_dir: Path) -> None:
    """Adapters of q and v only: the other groups' products have no A rows, and a fused step
    that adds q/k/v's by the kernel leaves them as the base computes them."""
    model = _model(tiny_chat_dir, torch.float32)
    decoder = _lean(model, native=True)
    lora = LoraBank(model, 1 << 20)
    for i, name in enumerate(("a", "b")):
        lora.acquire(
            name,
            lambda shapes, name=name, i=i: _random_adapter(
                {n: s for n, s in shapes.items() if n.endswith(("q_proj", "v_proj"))}, name, 4, seed=i
            ),
        )
    decoder.refresh(lora.view)
    lora.prepare(["a", None, "b"])
    _decode_both(model, decoder, lora, [4, 7, 5], steps=3, float32_tolerance=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_expand_adds_each_rows_own_adapter(dtype: torch.dtype) -> None:
    """The kernel against the masked products it replaces, on a group of three parts with rows of
    three adapters and one of none (unchanged, bit for bit), at widths off its 32-column blocks."""
    expand = LoraExpand.load(dtype)
    assert expand is not None, "the native kernel did not build (is cc installed?)"
    g = torch.Generator().manual_seed(0)
    width, parts = 16, [("q", 40), ("k", 24), ("v", 70)]
    out = sum(w for _, w in parts)
    weights = {}
    for name, w in parts:
        b = _zero_b(w, width, dtype)
        b.copy_(torch.randn(w, width, generator=g))
        weights[name] = (torch.zeros(width, 8, dtype=dtype), b)
    view = BankView({"a": (0, 4), "b": (4, 12), "c": (12, 16)}, weights, width)
    mask = torch.zeros(5, width, dtype=dtype)
    for row, (start, end) in enumerate([(0, 4), (0, 0), (4, 12), (12, 16), (0, 4)]):
        mask[row, start:end] = 1
    full = torch.randn(5, out + len(parts) * width, generator=g).to(dtype)
    want = full[:, :out].float().clone()
    start = 0
    for j, (name, w) in enumerate(parts):
        h = full[:, out + j * width : out + (j + 1) * width].float() * mask.float()
        want[:, start : start + w] += h @ weights[name][1].float().T
        start += w
    got = full.clone()
    expand.prepare(view, mask, 5)
    assert expand.add(got, out, parts, 0, "qkv")
    assert torch.equal(got[1], full[1]) and torch.equal(got[:, out:], full[:, out:])  # no adapter; A outputs
    ulp = 2**-7 if dtype == torch.bfloat16 else 1e-6  # one rounding of the sum in bf16
    torch.testing.assert_close(got[:, :out].float(), want, rtol=ulp, atol=ulp)
    assert not expand.add(got, out, [("absent", 8)], 0, "o")  # no adapted module in the group
    same = torch.zeros(1, width, dtype=dtype)
    same[0, 4:12] = 1  # every row one adapter (a prefill's span): one mask row for all
    expand.prepare(view, same, 5)
    again = full.clone()
    expand.add(again, out, parts, 0, "qkv")
    torch.testing.assert_close(again[2], got[2], rtol=0, atol=0)


def test_fused_matrices_follow_the_resident_adapters(tiny_chat_dir: Path) -> None:
    """A generation covers the view it was built for and any that only dropped adapters; a load
    (even the same adapter again, into the same columns) needs a new one, which the background
    builder publishes; the base columns of a fused product are the plain product's, bit for bit."""
    model = _model(tiny_chat_dir, torch.bfloat16)
    decoder = LeanDecoder.build(model, int8=False)
    assert decoder is not None and decoder.fuser is not None
    lora = LoraBank(model, 1 << 20)
    plain = decoder.weights
    load = {n: (lambda shapes, n=n: _random_adapter(shapes, n, 4, seed=1, dtype=torch.bfloat16)) for n in "ab"}
    for name in "ab":
        lora.acquire(name, load[name])
    assert not plain.covers(lora.view)
    decoder.fuser.want(lora.view)
    assert decoder.fuser.wait() and not decoder.fuser.busy
    fused = decoder.weights
    assert fused.covers(lora.view) and fused.adapter_bytes > 0 and fused.nbytes > plain.nbytes
    x = torch.randn(5, model.config.hidden_size).to(torch.bfloat16)
    for group in ("qkv", "o", "gate_up"):
        base, extended = plain.layers[0][group], fused.layers[0][group]
        assert extended.extra_rows == lora.view.width * len(decoder.layout[0][group])
        assert torch.equal(extended(x)[:, : extended.out], base(x))
    lora.release("b")
    lora.evict("b")
    assert fused.covers(lora.view)  # only dropped: b's columns are never selected
    lora.acquire("b", load["b"])
    assert lora.view.spans["b"] == fused.spans["b"] and not fused.covers(lora.view)
    decoder.fuser.close()


def test_idle_adapters_give_the_plain_matrices_back(tiny_chat_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fused ``A`` rows slow base rows too: after ``UNFUSE_AFTER_STEPS`` decode steps without an
    adapter the plain matrices are built again, and the next adapter step asks for fused ones."""
    monkeypatch.setattr(lean_decode, "UNFUSE_AFTER_STEPS", 3)
    model = _model(tiny_chat_dir, torch.bfloat16)
    decoder = LeanDecoder.build(model, int8=False)
    assert decoder is not None and decoder.fuser is not None
    lora = LoraBank(model, 1 << 20)
    lora.acquire("a", lambda shapes: _random_adapter(shapes, "a", 4, seed=1, dtype=torch.bfloat16))
    decoder.fuser.want(lora.view)
    assert decoder.fuser.wait() and decoder.weights.covers(lora.view)
    (cache, _), attention, positions = _padded_batch(model, [4], seed=0)
    tokens = torch.tensor([5])

    def step(adapter: str | None) -> None:
        nonlocal attention, positions
        attention = torch.cat([attention, torch.ones((1, 1), dtype=torch.long)], 1)
        lora.prepare([adapter])
        decoder(tokens, positions, attention, cache, lora.context)
        positions = positions + 1

    for _ in range(2):
        step(None)
    assert decoder.fuser.wait() and decoder.weights.width  # not yet: two steps
    step(None)
    assert decoder.fuser.wait() and decoder.weights.width == 0  # the plain matrices, published
    step("a")  # the adapter's step runs apart and asks for the fused matrices again
    # ... where the weights are packed for oneDNN (AVX-512); elsewhere fusing would copy every weight.
    assert decoder.fuser.wait() and decoder.weights.covers(lora.view) == decoder.can_fuse
    decoder.fuser.close()


def test_lean_step_with_adapters_before_and_after_fusing_agrees(tiny_chat_dir: Path) -> None:
    """The step computes the same logits with the A products apart and fused (bf16, rounding)."""
    model = _model(tiny_chat_dir, torch.bfloat16)
    decoder = _lean(model)
    lora = LoraBank(model, 1 << 20)
    for i, name in enumerate(("a", "b")):
        lora.acquire(
            name, lambda shapes, name=name, i=i: _random_adapter(shapes, name, 4, seed=i, dtype=torch.bfloat16)
        )
    (apart, fused), attention, positions = _padded_batch(model, [5, 8, 3], seed=3)
    (reference, _), _, _ = _padded_batch(model, [5, 8, 3], seed=3)  # prefilled without adapters, as those
    attention = torch.cat([attention, torch.ones((3, 1), dtype=torch.long)], 1)
    tokens = torch.tensor([5, 6, 7])
    lora.prepare(["a", "b", None])
    want = decoder(tokens, positions, attention, apart, lora.context)
    decoder.refresh(lora.view)
    got = decoder(tokens, positions, attention, fused, lora.context)
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)
    # The model with the adapted modules rounds its bf16 sums elsewhere: about 4% apart with these
    # large random adapters, where a missing or misplaced adapter is 100% or more.
    with torch.inference_mode():
        model_logits = model(
            input_ids=tokens[:, None],
            attention_mask=attention,
            position_ids=positions[:, None],
            cache=reference,
        ).logits[:, -1]
    for logits in (want, got):
        assert (logits - model_logits.float()).norm() / model_logits.float().norm() < 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_lean_norm_is_transformers_rms_norm_bit_for_bit(dtype: torch.dtype) -> None:
    """Over widths, row counts and magnitudes from 1e-3 to 1e3: one call of torch's ``rms_norm``
    gives what transformers' float32 operations give, so the step's logits stay the model's."""
    g = torch.Generator().manual_seed(0)
    for width in (32, 576, 896):
        norm = LlamaRMSNorm(width, eps=1e-5).to(dtype)
        norm.weight.data = (1 + 0.3 * torch.randn(width, generator=g)).to(dtype)
        for shape in ((1, 1), (64, 1), (1, 23)):
            for magnitude in (1e-3, 1.0, 1e3):
                h = (magnitude * torch.randn(*shape, width, generator=g)).to(dtype)
                assert torch.equal(lean_decode._rms_norm(h, norm.weight, 1e-5), norm(h))


def test_architectures_it_does_not_reproduce_keep_the_models_forward(tiny_chat_dir: Path, tiny_qwen2_dir: Path) -> None:
    model = _model(tiny_chat_dir, torch.float32)
    model.config.attention_bias = True  # Llama's biases include o_proj's
    assert LeanDecoder.build(model, int8=False) is None
    model.config.attention_bias = False
    model.config.model_type = "mistral"
    assert LeanDecoder.build(model, int8=False) is None
    qwen2 = _model(tiny_qwen2_dir, torch.float32)
    qwen2.config.layer_types = ["full_attention", "sliding_attention"]  # a sliding window from layer 1 on
    assert LeanDecoder.build(qwen2, int8=False) is None
    qwen2 = _model(tiny_qwen2_dir, torch.float32)
    o_proj = qwen2.model.layers[1].self_attn.o_proj
    o_proj.bias = torch.nn.Parameter(torch.ones(o_proj.out_features))
    assert LeanDecoder.build(qwen2, int8=False) is None
    assert LeanDecoder.build(_model(tiny_qwen2_dir, torch.float32), int8=False) is not None


@pytest.mark.skipif(not int8_supported(torch.bfloat16), reason="this torch build has no int8 weight kernel")
def test_int8_copies_are_close_and_only_used_for_small_batches() -> None:
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(96, 64, generator=g) * 0.05).to(torch.bfloat16)
    matrix = Int8Matrix(weight)
    assert matrix.q.dtype == torch.int8 and matrix.nbytes < weight.numel() * weight.element_size()
    small = torch.randn(1, INT8_MAX_ROWS, 64, generator=g).to(torch.bfloat16)
    want = F.linear(small, weight).float()
    got = matrix.linear(small).float()
    assert got.shape == want.shape
    assert not torch.equal(got, want)  # it really is the int8 copy that ran
    assert (got - want).norm() / want.norm() < 0.02
    large = torch.randn(INT8_MAX_ROWS + 1, 64, generator=g).to(torch.bfloat16)
    assert torch.equal(matrix.linear(large), F.linear(large, weight))


def test_packed_copies_compute_what_f_linear_computes(tiny_chat_dir: Path) -> None:
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(96, 64, generator=g) * 0.05).to(torch.bfloat16)
    packed = PackedMatrix.of(weight)
    if packed is None:
        pytest.skip("this torch build cannot pack weights for oneDNN")
    for shape in [(1, 64), (1, 1, 64), (3, 1, 64), (1, 300, 64)]:  # a row, a step of rows, a packed prefill
        x = torch.randn(*shape, generator=g).to(torch.bfloat16)
        assert torch.equal(packed.linear(x), F.linear(x, weight))
    decoder = LeanDecoder.build(_model(tiny_chat_dir, torch.bfloat16), int8=False)
    assert decoder is not None and decoder.packed_bytes > 0  # the lean step reads the packed copies


def test_float32_packed_copies_give_each_row_one_result_whatever_its_batch(tiny_chat_dir: Path) -> None:
    # float32 products sum in oneDNN's order, not MKL's: within rounding of F.linear, and a row's
    # result is the same alone or among others (a speculative verify's rows are decode steps').
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=g) * 0.05
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    packed = PackedMatrix.of(weight)
    assert packed is not None
    rows = torch.randn(16, 64, generator=g)
    together = packed.linear(rows)
    torch.testing.assert_close(together, F.linear(rows, weight), rtol=1e-5, atol=1e-6)
    alone = torch.cat([packed.linear(rows[i : i + 1]) for i in range(16)])
    assert torch.equal(alone, together)
    decoder = LeanDecoder.build(_model(tiny_chat_dir, torch.float32), int8=False)
    assert decoder is not None and decoder.packed_bytes > 0  # the float32 lean step reads them too


def test_a_lone_row_over_1536_inputs_gets_the_bits_it_gets_among_other_rows() -> None:
    """On a 2-core AMD EPYC with AVX-512 BF16, oneDNN's product of one row over 1,536 inputs summed
    in another order than its product of several rows (every float32 row, some bf16 rows).
    ``one_row_differs`` finds such a matrix, and a lone row padded to two then gets its bits."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        matrix = Matrix((torch.randn(96, 1536, generator=g) * 0.05).to(dtype))
        matrix.pad_one_row = matrix.one_row_differs()
        rows = torch.randn(64, 1536, generator=g).to(dtype)
        together = matrix(rows)
        assert torch.equal(torch.cat([matrix(rows[i : i + 1]) for i in range(64)]), together)
        assert torch.equal(matrix(rows[:1, None]), together[:1, None])  # (1, 1, inputs): a decode step's


def lone_rows_differ_over(inputs: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate a CPU whose product of one row over ``inputs`` comes out a float step higher than
    the same row's among several (as oneDNN's over 1,536 inputs summed otherwise on one EPYC)."""
    product = Matrix._product

    def lone_rows_differ(self: Matrix, x: torch.Tensor) -> torch.Tensor:
        y = product(self, x)
        return torch.nextafter(y, torch.full_like(y, torch.inf)) if self.inputs == x.numel() == inputs else y

    monkeypatch.setattr(Matrix, "_product", lone_rows_differ)
    monkeypatch.setattr(packed, "_lone_rows_differ", {})  # what the real CPU gave is not this one's


def test_the_decoder_pads_the_lone_row_products_this_cpu_sums_otherwise(
    tiny_chat_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CPU whose lone-row product over 64 inputs (the tiny model's down product) comes out a float
    step higher, as the EPYC's over 1,536 did: ``match_lone_rows`` pads that shape alone, a verify's
    rows are then the decode steps' bit for bit (the speculative probe passes), and matrices built
    again (when adapters come or go) keep the padding."""
    lone_rows_differ_over(64, monkeypatch)
    model = _model(tiny_chat_dir, torch.float32)
    decoder = LeanDecoder.build(model, int8=False, native=False)
    assert decoder is not None

    def verify_matches() -> bool:
        monkeypatch.setattr(speculative, "_probed", {})  # probed anew
        return speculative.verify_matches_steps(model, decoder, 9)

    assert not verify_matches()  # the simulated CPU: a verify's rows are not the lone decode steps
    decoder.match_lone_rows()
    assert decoder.padded_shapes == {(32, 64)}
    assert verify_matches()
    decoder.refresh(EMPTY_VIEW)
    assert [m.pad_one_row for layer in decoder.weights.layers for m in layer.values()] == [
        m.inputs == 64 for layer in decoder.weights.layers for m in layer.values()
    ]


@pytest.mark.skipif(not int8_supported(torch.bfloat16), reason="this torch build has no int8 weight kernel")
def test_int8_decoding_stays_close_to_bf16(tiny_decoder_dir: Path) -> None:
    model = _model(tiny_decoder_dir, torch.bfloat16)
    reference = LeanDecoder(model, int8=False)
    (cache_a, cache_b), attention, positions = _padded_batch(model, [6], seed=1)
    tokens = torch.tensor([5])
    attention = torch.cat([attention, torch.ones((1, 1), dtype=torch.long)], 1)
    want = reference(tokens, positions, attention, cache_a, LoraBank(model, 1).context)
    quantised = LeanDecoder(model, int8=True)
    assert quantised.int8_bytes > 0
    got = quantised(tokens, positions, attention, cache_b, LoraBank(model, 1).context)
    assert torch.softmax(got, -1).sub(torch.softmax(want, -1)).abs().max() < 0.05


def test_stale_and_dropped_generations_still_decode_like_the_adapted_modules(tiny_chat_dir: Path) -> None:
    """Matrices fused for other adapters than the resident ones (a load since) are read for their
    base columns only; after a drop they still serve; an adapter loaded into a dropped one's
    columns waits for new ones. Every step matches the model with the adapted modules."""
    model = _model(tiny_chat_dir, torch.float32)
    decoder = _lean(model)
    lora = LoraBank(model, 1 << 20)

    def load(name: str, seed: int) -> None:
        lora.acquire(name, lambda shapes: _random_adapter(shapes, name, 4, seed=seed))

    load("a", 0)
    load("b", 1)
    decoder.refresh(lora.view)
    load("c", 2)  # the fused matrices hold a's and b's A rows only
    assert decoder.weights.width and not decoder.weights.covers(lora.view)
    lora.prepare(["a", "c", None])
    _decode_both(model, decoder, lora, [4, 7, 5], steps=3)
    decoder.refresh(lora.view)
    lora.release("b")
    lora.evict("b")
    assert decoder.weights.covers(lora.view)
    lora.prepare(["c", "a"])
    _decode_both(model, decoder, lora, [6, 3], steps=3)
    load("d", 3)  # into b's old columns
    assert not decoder.weights.covers(lora.view)
    lora.prepare(["d", "a"])
    _decode_both(model, decoder, lora, [5, 4], steps=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_background_fusing_is_for_packed_weights_and_stops_with_the_runner(
    tiny_chat_dir: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    with monkeypatch.context() as unpacked:  # as on a torch build without oneDNN
        unpacked.setattr(PackedMatrix, "of", classmethod(lambda cls, weight: None))
        assert not _lean(_model(tiny_chat_dir, dtype)).can_fuse  # it would copy every weight
    model = _model(tiny_chat_dir, dtype)
    decoder = LeanDecoder.build(model, int8=False)
    assert decoder is not None and decoder.fuser is not None
    if not decoder.can_fuse:
        pytest.skip(f"this CPU or torch build cannot pack {dtype} weights for oneDNN")
    lora = LoraBank(model, 1 << 20)
    lora.acquire("a", lambda shapes: _random_adapter(shapes, "a", 4, seed=0, dtype=dtype))
    (cache, _), attention, positions = _padded_batch(model, [3, 5], seed=4)
    attention = torch.cat([attention, torch.ones((2, 1), dtype=torch.long)], 1)
    lora.prepare(["a", None])
    decoder(torch.tensor([5, 6]), positions, attention, cache, lora.context)  # asks for fused matrices
    assert decoder.fuser.wait() and decoder.weights.covers(lora.view)
    lora.release("a")
    lora.evict("a")
    lora.prepare([None, None])
    decoder(torch.tensor([5, 6]), positions + 1, torch.cat([attention, attention[:, :1]], 1), cache, lora.context)
    assert decoder.fuser.wait() and decoder.weights.width == 0  # no adapter left: plain matrices again
    thread = decoder.fuser._thread
    decoder.fuser.close()
    assert thread is not None and not thread.is_alive()


# What a one-row decode step may call a layer, counted as torch's Python dispatch sees them.
LAYER_OPERATOR_CALLS = 42


class _OperatorCalls(TorchDispatchMode):
    """Counts the tensor operators called while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_a_one_row_step_calls_few_operators_a_layer(tiny_chat_dir: Path) -> None:
    """At one row a decode step's operators cost more to call than to run (a layer's vectors are a
    few hundred numbers; docs/performance.md, "What a single stream's token costs"), so what a layer
    calls is counted: the model with one layer less calls that many fewer. The cache is past SDPA's
    length, so the step takes the grouped products, as a served stream's longer answers do."""
    calls = []
    for layers in (2, 1):
        model = _model(tiny_chat_dir, torch.bfloat16)
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        decoder = LeanDecoder.build(model, int8=False)
        assert decoder is not None
        decoder.fuser = None
        cache = new_cache(model.config)
        prompt = list(range(3, 3 + SDPA_MAX_POSITIONS + 5))
        decoder.prefill([(prompt, 0, cache)])
        seen = len(prompt) + 1
        with _OperatorCalls() as counted:
            decoder(
                torch.tensor([3]), torch.tensor([len(prompt)]), torch.ones((1, seen), dtype=torch.long), cache, None
            )
        calls.append(counted.calls)
    assert calls[0] - calls[1] <= LAYER_OPERATOR_CALLS
