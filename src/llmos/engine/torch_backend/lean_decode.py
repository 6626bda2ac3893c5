"""One decode step of a Llama-family model (Llama, and Qwen2 with its q/k/v biases), written out
in a few dozen tensor operations.

A decode step of a small model on a CPU is dominated by the cost of each operation, not its
arithmetic: transformers' generic forward (mask builders, per-module hooks, separate q/k/v and
gate/up products, rotary embedding of q and k apart) takes about a third longer a step than
this one, with the same weights and the same cache (docs/performance.md, design measurements)
and the same logits (bit for bit for one row over a short cache in bf16, except on a CPU whose
lone-row products are padded, see ``match_lone_rows``; batches and long caches differ by
rounding, see ``attention``). It computes what
``LlamaForCausalLM`` computes for one new token per row, reads and writes the engine's own
key/value cache, and applies the LoRA bank's adapters, so it is a drop-in replacement for the
decode call. Prefill chunks run the same layers, several prompts (with their adapters) packed
into one pass (``prefill``).

The q/k/v and gate/up weight matrices are concatenated once and the original modules' weights
become views into the concatenation; the products read copies packed for oneDNN (``packed``:
the same results, without a weight reorder on every call), with the resident LoRA adapters'
``A`` rows appended once they are built (``fused_weights``). With ``int8`` a step of one row
without adapters reads int8 copies of the matrices instead (see ``int8``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from llmos.engine.torch_backend.attention import StepWindow
from llmos.engine.torch_backend.fused_weights import Generation, GenerationBuilder, build_generation
from llmos.engine.torch_backend.int8 import INT8_MAX_ROWS, Int8Matrix, int8_supported
from llmos.engine.torch_backend.lora_bank import EMPTY_VIEW, BankView
from llmos.engine.torch_backend.lora_expand import LoraExpand
from llmos.engine.torch_backend.lora_groups import OUTPUT_GROUP, Layout, LoraGroups
from llmos.engine.torch_backend.packed import Matrix

# Qwen2 is Llama with biases on the q/k/v projections (and optionally sliding windows, refused).
SUPPORTED_MODEL_TYPES = frozenset({"llama", "qwen2"})
# Adapters' A rows are appended to the base matrices (fused_weights) while the resident adapters
# have at most this many columns in all: every product then reads every resident adapter's A,
# base rows included, and fused decode steps add the B products by the native kernel. Beyond, the
# A rows cost more than the separate A products they save. At this limit (32 rank-8 adapters)
# fused steps still serve more tokens/s than unfused ones, but only with the native kernel: without
# it fused was the slower (docs/performance.md, design measurements).
FUSE_MAX_COLUMNS = 256
# Fused A rows slow every product, base rows' too (with many resident adapters, markedly), so
# after this many decode steps in a row without an adapter (a sustained stretch of base-only
# traffic, not a pause between adapter requests) the plain matrices are built again; the next
# adapter request asks for the fused ones (until they are published it computes its A products
# apart). A rebuild costs a fraction of a second of one core on the builder's thread, small
# beside the stretch of traffic it waits for (docs/performance.md, design measurements).
UNFUSE_AFTER_STEPS = 1024


@dataclass
class _Layer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor


def _fuse(modules: list[nn.Linear]) -> torch.Tensor:
    """Concatenate the modules' weights and make each module's weight a view into the result."""
    fused = torch.cat([m.weight.detach() for m in modules])
    start = 0
    for m in modules:
        rows = m.weight.shape[0]
        m.weight = nn.Parameter(fused[start : start + rows], requires_grad=False)
        start += rows
    return fused


def _qkv(layer: Any) -> list[nn.Linear]:
    return [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]


def _rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm as transformers computes it (in float32, rounded before the weight), so
    the step's outputs are those of the model's own forward, not merely close to them: torch's
    ``rms_norm`` computes a bf16 input in float32 and rounds once on output, bit for bit what
    transformers' float32 operations and cast give (tested), in one call from Python."""
    return weight * F.rms_norm(h, h.shape[-1:], eps=eps)


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    """transformers' ``rotate_half`` without its negation (``_forward`` negates the sines instead).
    One ``roll`` by half the width, the same elements as slicing both halves and concatenating
    them, in one operator call instead of three: at one row a step's operators cost more to call
    than to run, and this one runs once a layer."""
    return torch.roll(x, x.shape[-1] // 2, dims=-1)


def reproduces(config: Any) -> bool:
    """Whether the lean step reproduces a model of ``config`` exactly, as far as its config says
    (``LeanDecoder.build`` also checks the loaded layers' biases)."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return False
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return False
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        return False  # a layer attending to a window of the cache, not all of it
    return getattr(config, "pretraining_tp", 1) == 1


class LeanDecoder:
    """``decoder(tokens, positions, attention, cache) -> (B, vocab) float32 logits``."""

    def __init__(self, model: Any, *, int8: bool, native: bool = True) -> None:
        """``native``: add mixed adapters' products by the native kernel where it builds."""
        config = model.config
        self.model = model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.scale = self.head_dim**-0.5
        self.width = config.hidden_size
        self.act = ACT2FN[config.hidden_act].forward  # the module's function, without its call hooks
        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm.weight
        self.int8 = int8
        self.layers = [
            _Layer(input_norm=layer.input_layernorm.weight, post_norm=layer.post_attention_layernorm.weight)
            for layer in inner.layers
        ]
        # Per layer (the output layer last), each group's (fused) base matrix.
        self._base: list[dict[str, torch.Tensor]] = [
            {
                "qkv": _fuse([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                "o": layer.self_attn.o_proj.weight,
                "gate_up": _fuse([layer.mlp.gate_proj, layer.mlp.up_proj]),
                "down": layer.mlp.down_proj.weight,
            }
            for layer in inner.layers
        ] + [{OUTPUT_GROUP: model.lm_head.weight}]
        # Per layer, the groups with a bias: Qwen2's q/k/v (``build`` refuses any other bias).
        self._biases: list[dict[str, torch.Tensor]] = [
            {"qkv": torch.cat([m.bias.detach() for m in _qkv(layer)])}
            if layer.self_attn.q_proj.bias is not None
            else {}
            for layer in inner.layers
        ] + [{}]
        self._int8 = (
            [
                {g: Int8Matrix(w, biases.get(g)) for g, w in groups.items()}
                for groups, biases in zip(self._base, self._biases, strict=True)
            ]
            if int8
            else None
        )
        names = {id(module): name for name, module in model.named_modules()}

        def named(*modules: nn.Linear) -> list[tuple[str, int]]:
            return [(names[id(m)], m.out_features) for m in modules]

        self.layout: Layout = [
            {
                "qkv": named(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                "o": named(layer.self_attn.o_proj),
                "gate_up": named(layer.mlp.gate_proj, layer.mlp.up_proj),
                "down": named(layer.mlp.down_proj),
            }
            for layer in inner.layers
        ] + [{OUTPUT_GROUP: named(model.lm_head)}]
        dtype = next(model.parameters()).dtype
        self.adapters = LoraGroups(self.layout, LoraExpand.load(dtype) if native else None)
        self.padded_shapes: frozenset[tuple[int, int]] = frozenset()  # (outputs, inputs): see match_lone_rows
        self.weights: Generation = build_generation(self._base, self.layout, EMPTY_VIEW, self._biases)
        # Only packed matrices are fused in the background: unpacked (a build without oneDNN) a
        # generation would be a second copy of every weight.
        self.can_fuse = all(m.packed is not None for layer in self.weights.layers for m in layer.values())
        # None: no background builds (tests choose the path with ``refresh``).
        self.fuser: GenerationBuilder | None = GenerationBuilder(self._generation, self._publish)
        self._plain_steps = 0  # decode steps in a row without adapters over fused products

    def _generation(self, view: BankView) -> Generation:
        generation = build_generation(self._base, self.layout, view, self._biases)
        self._pad_lone_rows(generation)
        return generation

    def match_lone_rows(self) -> None:
        """Make a lone row's weight products give the bits that the same row gets among others,
        where this CPU's differ (``Matrix.one_row_differs``, per shape): then a decode step of one
        row and a speculative verify of several positions agree, as the verify's per-position
        attention already does. (Its attention and adapter products still let a row alone differ
        from the same row in a batch of many.) Call on a compute thread."""
        shapes: dict[tuple[int, int], Matrix] = {}
        for layer in self.weights.layers:
            for matrix in layer.values():
                shapes.setdefault((matrix.out, matrix.inputs), matrix)
        self.padded_shapes = frozenset(shape for shape, matrix in shapes.items() if matrix.one_row_differs())
        self._pad_lone_rows(self.weights)

    def _pad_lone_rows(self, generation: Generation) -> None:
        for layer in generation.layers:
            for matrix in layer.values():
                matrix.pad_one_row = (matrix.out, matrix.inputs) in self.padded_shapes

    def _publish(self, generation: Generation) -> None:
        self.weights = generation  # one assignment: the engine thread reads it once a pass

    def refresh(self, view: BankView) -> None:
        """Build ``view``'s matrices now, on this thread (tests; the engine asks ``fuser``)."""
        self._publish(self._generation(view))

    @classmethod
    def build(cls, model: Any, *, int8: bool, native: bool = True) -> LeanDecoder | None:
        """A decoder for ``model``, or None when its architecture is not one this step reproduces
        exactly (the engine then decodes with the model's own forward)."""
        if not reproduces(model.config):
            return None
        for layer in model.model.layers:
            biased = [m.bias is not None for m in _qkv(layer)]
            others = (layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
            if len(set(biased)) > 1 or any(m.bias is not None for m in others):
                return None
        if getattr(model.lm_head, "bias", None) is not None:
            return None
        dtype = next(model.parameters()).dtype
        return cls(model, int8=int8 and int8_supported(dtype), native=native)

    @property
    def int8_bytes(self) -> int:
        """Memory held by the int8 copies."""
        return sum(m.nbytes for groups in self._int8 or [] for m in groups.values())

    @property
    def packed_bytes(self) -> int:
        """Memory held by the matrices' packed copies (adapters' ``A`` rows included)."""
        return self.weights.nbytes

    @torch.inference_mode()
    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, attention: torch.Tensor, cache: Any, lora: Any
    ) -> torch.Tensor:
        """One decode step: ``tokens`` (B,) at ``positions`` (B,) over ``cache``; (B, vocab) logits."""
        rows = tokens.shape[0]
        # No padding mask when no row has padding: the step attends to every cached position anyway.
        padding = None if bool(attention.all()) else attention == 0
        window = StepWindow.of(rows, attention.shape[1], padding)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.layers[layer].extend(k, v)
            return window.attend(q, cache.layers[layer], self.scale)

        weights, adapters, fused = self._prepare(lora, rows, None, decode=True)
        int8 = self._int8 if rows <= INT8_MAX_ROWS and not fused else None
        return self._forward(tokens[:, None], positions[:, None], attend, weights, adapters, fused, [0], int8)[:, 0]

    @torch.inference_mode()
    def verify(self, tokens: list[int], start: int, cache: Any, lora: Any = None) -> torch.Tensor:
        """Every position's logits, (len(tokens), vocab), of ``tokens`` at positions ``start``...
        after the states in ``cache`` (which it extends): speculative decoding's verify pass.

        Each position gets what a decode step of one row computes there, bit for bit in bf16 too,
        where the weight products give a row the same result whatever the rows beside it (not on
        every CPU: ``speculative.verify_matches_steps`` checks at load, docs/adr/0027 sixth
        addendum), since each position's attention is the step's own: the same window of the
        cache (``StepWindow``), every position after it masked. A packed prefill's attention (one masked call for all
        positions) rounds differently in bf16, by up to half a logit on SmolLM2, and greedy
        verifies then flipped near ties, so answers drifted from plain decoding's (docs/adr/0027)."""
        count = len(tokens)
        past = cache.get_seq_length()
        windows = [StepWindow.of(1, past + i + 1, None) for i in range(count)]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            states = cache.layers[layer]
            states.extend(k, v)
            return torch.cat([w.attend(q[:, :, i : i + 1], states, self.scale) for i, w in enumerate(windows)], dim=1)

        last = list(range(count))
        weights, adapters, fused = self._prepare(lora, count, last, decode=False)
        ids, positions = torch.tensor([tokens]), torch.arange(start, start + count)[None]
        return self._forward(ids, positions, attend, weights, adapters, fused, last, None)[0]

    def _prepare(self, lora: Any, rows: int, last: list[int] | None, *, decode: bool) -> tuple[Generation, bool, bool]:
        """This pass's matrices, whether it has adapters, and whether their ``A`` outputs come
        with the base products (else they are computed apart, and the fused matrices are asked
        for)."""
        weights = self.weights
        adapters = lora is not None and lora.active
        fused = False
        if adapters:
            self._plain_steps = 0
        elif decode and weights.width:
            self._plain_steps += 1
        # Every adapter gone, or the resident ones idle for a while: no more A rows in the products.
        idle = lora is not None and (not lora.view.spans or self._plain_steps >= UNFUSE_AFTER_STEPS)
        if not adapters and weights.width and self.fuser is not None and idle:
            self.fuser.want(EMPTY_VIEW)
        if adapters:
            view = lora.view
            fused = weights.covers(view)
            if not fused and self.fuser is not None and self.can_fuse:
                # Too many adapters resident to fuse: back to the plain matrices.
                wanted = view if view.width <= FUSE_MAX_COLUMNS else EMPTY_VIEW
                if wanted.width or weights.width:
                    self.fuser.want(wanted)
            self.adapters.prepare(lora, rows, last, fused=fused, decode=decode)
        return weights, adapters, fused

    @torch.inference_mode()
    def prefill(
        self, chunks: Sequence[tuple[list[int], int, Any]], lora: Any = None, every: Sequence[bool] = ()
    ) -> torch.Tensor:
        """The next chunk of each of several prompts: ``(tokens, start, cache)``, the tokens at
        positions ``start``... after the states in ``cache`` (earlier chunks, a cached prefix,
        virtual tokens), which it extends; ``lora``: the bank's context prepared with one entry
        per token (each token its prompt's adapter, or none). Returns each chunk's last
        position's logits, (chunks, vocab), or every position's for the chunks that ``every``
        marks (prompts being scored), in chunk order.

        The chunks are packed into one sequence (vLLM's varlen prefill): every weight product runs
        once over all their tokens, which on a CPU costs far less than one pass a prompt (a pass
        reads every weight, however few its tokens); only
        attention runs per prompt, over its own cache. For one chunk it computes what the model's
        forward computes (bit for bit for a first chunk in bf16)."""
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        spans, offset = [], 0
        for tokens, _, _ in chunks:
            spans.append((offset, len(tokens)))
            offset += len(tokens)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            outs = []
            for (first, count), (_, _, cache) in zip(spans, chunks, strict=True):
                end = first + count
                keys, values = cache.layers[layer].update(k[:, :, first:end], v[:, :, first:end])
                past = keys.shape[2] - count
                # Causal among the new tokens, every earlier position seen (from an empty cache
                # SDPA's own causal flag, the kernel the model's forward uses).
                mask = torch.ones(count, past + count, dtype=torch.bool).tril(past) if past else None
                outs.append(
                    F.scaled_dot_product_attention(
                        q[:, :, first:end],
                        keys,
                        values,
                        attn_mask=mask,
                        is_causal=not past,
                        enable_gqa=kv_heads != heads,
                    )
                )
            o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
            return o.transpose(1, 2).reshape(1, offset, heads * dim)

        ids = torch.tensor([[t for chunk, _, _ in chunks for t in chunk]])
        positions = torch.cat([torch.arange(start, start + len(chunk)) for chunk, start, _ in chunks])[None]
        last = [
            position
            for i, (first, count) in enumerate(spans)
            for position in (range(first, first + count) if i < len(every) and every[i] else [first + count - 1])
        ]
        weights, adapters, fused = self._prepare(lora, offset, last, decode=False)
        return self._forward(ids, positions, attend, weights, adapters, fused, last, None)[0]

    def _forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        attend: Any,
        weights: Generation,
        adapters: bool,
        fused: bool,
        last: list[int],
        int8: list[dict[str, Int8Matrix]] | None,
    ) -> torch.Tensor:
        """The layers over (B, T) ``tokens``; ``attend(layer, q, k, v)`` stores the new keys and
        values in the cache and returns the attention of the new positions. Returns the float32
        logits at positions ``last`` of the T axis, (B, len(last), vocab)."""
        rows, count = tokens.shape
        h = self.embed(tokens)
        cos, sin = self.rotary(h, positions)
        # rotate_half(x) * sin is swap_halves(x) * sin with the first half of sin negated, bit for bit
        # (negation is exact): negated once a step, not once a layer.
        half = sin.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        cos, sin = cos[:, :, None], sin[:, :, None]  # (B, T, 1, head_dim): one angle per position, every head

        def project(x: torch.Tensor, layer: int, group: str) -> torch.Tensor:
            """A group's (fused) base product plus, when the batch has adapters, theirs."""
            if int8 is not None:
                y = int8[layer][group].linear(x)
            else:
                matrix = weights.layers[layer][group]
                y = matrix(x)
                if matrix.extra_rows:  # the resident adapters' A outputs follow the base output
                    if fused:
                        return self.adapters.apply_fused(y, matrix.out, layer, group)
                    y = y[..., : matrix.out]
            return self.adapters.apply(y, x, layer, group) if adapters else y

        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        qk_width = (heads + kv_heads) * dim
        for i, layer in enumerate(self.layers):
            x = _rms_norm(h, layer.input_norm, self.eps)
            qkv = project(x, i, "qkv")
            qk = qkv[..., :qk_width].view(rows, count, heads + kv_heads, dim)
            qk = qk * cos + _swap_halves(qk) * sin
            q = qk[:, :, :heads].transpose(1, 2)
            k = qk[:, :, heads:].transpose(1, 2)
            v = qkv[..., qk_width:].view(rows, count, kv_heads, dim).transpose(1, 2)
            h = h + project(attend(i, q, k, v), i, "o")
            x = _rms_norm(h, layer.post_norm, self.eps)
            gate, up = project(x, i, "gate_up").chunk(2, dim=-1)
            h = h + project(self.act(gate) * up, i, "down")
        h = _rms_norm(h[:, last], self.norm, self.eps)
        return project(h, len(self.layers), OUTPUT_GROUP).float()
