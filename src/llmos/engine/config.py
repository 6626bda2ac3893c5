"""The engine's configuration: one typed object built from ``Settings`` and passed whole.

Every runner, backend and the facade read their options from here, so a new option is added in
one place instead of being threaded as a keyword through three layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmos.config import Settings


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32
    """Sequences the llama.cpp backend decodes together at most (its slots)."""
    step_token_budget: int = 640
    """Tokens one torch engine step computes: a token per decoding row, then prompt chunks."""
    batch_wait_s: float = 0.005
    """How long an idle engine loop waits, from a first request's arrival, for company."""
    prefill_chunk_tokens: int = 512
    """Most prompt tokens prefilled per engine iteration (one pass), between decode steps."""
    scoring_step_tokens: int = 8
    """Most prompt tokens a step gives scoring requests while generating ones are about."""
    scoring_pause_ratio: float = 1.0
    """Before a scoring-only step while generating requests are about, the engine waits this many
    times the last step's time for a generating arrival (0: never)."""
    tenant_rows_when_shared: int = 0
    """Rows each tenant may hold while a light tenant is active (0: no caps; ``kernel.fair_share``)."""
    kv_cache_bytes: int = 4096 << 20
    """The torch backend's key/value budget per chat model (admission reserves against it)."""
    prefix_cache_bytes: int = 256 << 20
    """Prompt states kept for reuse per chat model; 0 turns prefix sharing off in every backend."""
    heap_slack_bytes: int = 32 << 20
    """Freed memory the process may keep resident while an engine works before the engine trims
    the heap after its step (``heap.release_beyond``); 0: only when it goes idle."""
    adapter_memory_bytes: int = 512 << 20
    """The adapter bank of one chat model."""
    decode_int8: bool = False
    """Single-row decode steps read int8 copies of the weights."""
    native_kernels: bool = True
    """Build and use the C kernels (torch_backend/native) where a compiler is available."""
    llamacpp_cache_tokens: int = 16384
    """Cells of the llama.cpp backend's unified key/value cache, allocated at load."""
    gguf_backend: str = "torch"
    """Which backend serves chat models pulled from GGUF: ``torch`` or ``llama.cpp``."""
    gpu_backend: str = "auto"
    """Whether chat models go to vLLM on a GPU: ``auto`` (where it can serve them), ``vllm`` or ``torch``."""
    vllm_gpu_memory_utilization: float = 0.85
    """Fraction of a GPU's memory a model vLLM serves takes."""
    vllm_max_lora_rank: int = 64
    """Largest LoRA rank vLLM applies."""
    threads: int = 0
    """Cores a compute thread uses (0: torch's default)."""
    dtype: str = "auto"
    """``auto`` (bf16 where the CPU computes it fast), ``bfloat16`` or ``float32``."""
    memory_budget_bytes: int = 8192 << 20
    """Resident models' estimated bytes; the least recently used idle one is evicted beyond it."""
    max_pending_requests: int = 256
    """Requests admitted into the engine at once; more get 503 with Retry-After."""
    grammar_compile_budget: int = 1_000_000
    """Work a structured-output grammar may take to compile (llguidance's lexer fuel)."""
    grammar_cache_entries: int = 256
    """Compiled grammars kept per model tokenizer."""
    metrics: bool = True
    """Observe the engine's own metrics (queue time); ``metrics_enabled``."""
    speculative_decoding: str = "auto"
    """Single streams speculate: ``auto`` (where it pays, ``speculative``), ``ngram`` (always) or ``off``."""
    speculative_tokens: int = 8
    """Most draft tokens one verify pass checks."""
    draft_models: tuple[tuple[str, str], ...] = ()
    """Pairs of a chat model's name and the model that drafts for its single streams."""

    @classmethod
    def from_settings(cls, settings: Settings) -> EngineConfig:
        return cls(
            max_batch_size=settings.max_batch_size,
            step_token_budget=settings.step_token_budget,
            batch_wait_s=settings.batch_wait_ms / 1000,
            prefill_chunk_tokens=settings.prefill_chunk_tokens,
            scoring_step_tokens=settings.scoring_step_tokens,
            scoring_pause_ratio=settings.scoring_pause_ratio,
            tenant_rows_when_shared=settings.tenant_rows_when_shared,
            kv_cache_bytes=settings.kv_cache_mb << 20,
            prefix_cache_bytes=settings.prefix_cache_mb << 20,
            heap_slack_bytes=settings.heap_slack_mb << 20,
            adapter_memory_bytes=settings.adapter_memory_mb << 20,
            decode_int8=settings.decode_weights == "int8",
            native_kernels=settings.native_kernels,
            llamacpp_cache_tokens=settings.llamacpp_cache_tokens,
            gguf_backend=settings.gguf_backend,
            gpu_backend=settings.gpu_backend,
            vllm_gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
            vllm_max_lora_rank=settings.vllm_max_lora_rank,
            threads=settings.threads,
            dtype=settings.dtype,
            memory_budget_bytes=settings.memory_budget_mb << 20,
            max_pending_requests=settings.max_pending_requests,
            grammar_compile_budget=settings.grammar_compile_budget,
            grammar_cache_entries=settings.grammar_cache_entries,
            metrics=settings.metrics_enabled,
            speculative_decoding=settings.speculative_decoding,
            speculative_tokens=settings.speculative_tokens,
            draft_models=tuple(settings.draft_models.items()),
        )
