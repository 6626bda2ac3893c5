"""llama.cpp through llama-cpp-python's C bindings: one GGUF model, one context whose unified
key/value cache holds many sequences, and batches filled from numpy.

The high-level ``llama_cpp.Llama`` decodes one sequence at a time; a server needs several in
one ``llama_decode`` call (each token tagged with its sequence and position), which only the C
API offers. Sequences share cache cells: copying a prefix to a new sequence
(``llama_memory_seq_cp``) adds the sequence to the cells, it copies no data.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

import numpy as np

from llmos.errors import ModelLoadError

log = logging.getLogger(__name__)
KV_BYTES_PER_VALUE = 2  # the cache holds keys and values in float16 (llama.cpp's default)
INSTALL_HINT = (
    'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" '
    "pip install llama-cpp-python"
)
GGML_LOG_LEVEL_ERROR = 4
_LOG_SINK: Any = None  # ctypes callback silencing llama.cpp's stderr chatter; kept alive for the process


def bindings() -> Any:
    """The ``llama_cpp`` module, initialised once; ModelLoadError when it is not installed."""
    global _LOG_SINK
    try:
        import llama_cpp
    except ImportError as exc:
        raise ModelLoadError(f"the llama.cpp backend needs llama-cpp-python: {INSTALL_HINT}") from exc
    if _LOG_SINK is None:
        _LOG_SINK = llama_cpp.llama_log_callback(_quiet)
        llama_cpp.llama_log_set(_LOG_SINK, None)
        llama_cpp.llama_backend_init()
    return llama_cpp


def _quiet(level: int, text: bytes, user_data: Any) -> None:
    if level == GGML_LOG_LEVEL_ERROR:
        log.warning("llama.cpp: %s", text.decode(errors="replace").rstrip())


class DecodeError(RuntimeError):
    """``llama_decode`` refused a batch; ``no_room`` when the cache had no free cells for it."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.no_room = code == 1
        super().__init__(
            "the key/value cache has no room for this batch" if self.no_room else f"llama_decode failed (code {code})"
        )


class LlamaCpp:
    """A GGUF model and a context of ``n_ctx`` cache cells shared by up to ``n_seq_max`` sequences;
    each ``decode`` call takes at most ``n_batch`` tokens."""

    def __init__(self, path: Path, *, n_ctx: int, n_seq_max: int, n_batch: int, threads: int) -> None:
        lib = self._lib = bindings()
        params = lib.llama_model_default_params()
        self._model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise ModelLoadError(f"llama.cpp could not load {path.name}")
        ctx_params = lib.llama_context_default_params()
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = ctx_params.n_ubatch = n_batch
        ctx_params.n_seq_max = min(n_seq_max, lib.llama_max_parallel_sequences())
        ctx_params.n_threads = ctx_params.n_threads_batch = threads
        # One cache for all sequences: prefixes are shared, not copied, and a sequence may use any
        # free cell (per-sequence streams would split the cells evenly and copy shared prefixes).
        ctx_params.kv_unified = True
        self._ctx = lib.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            lib.llama_model_free(self._model)
            raise ModelLoadError(f"llama.cpp could not create a context of {n_ctx} tokens for {path.name}")
        self._memory = lib.llama_get_memory(self._ctx)
        self.n_ctx = int(lib.llama_n_ctx(self._ctx))
        self.n_seq_max = int(lib.llama_n_seq_max(self._ctx))
        self.n_batch = n_batch
        self.n_vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self._model)))
        heads, kv_heads = lib.llama_model_n_head(self._model), lib.llama_model_n_head_kv(self._model)
        head_dim = lib.llama_model_n_embd(self._model) // heads
        arch = self._meta("general.architecture")
        key_dim = int(self._meta(f"{arch}.attention.key_length") or head_dim)
        value_dim = int(self._meta(f"{arch}.attention.value_length") or head_dim)
        layers = lib.llama_model_n_layer(self._model)
        self.kv_bytes_per_token = layers * kv_heads * (key_dim + value_dim) * KV_BYTES_PER_VALUE
        # Recurrent and hybrid models keep one state per sequence, not one per position, and
        # sliding-window layers reuse cells: a prefix of them cannot be handed to another sequence.
        self.shares_prefixes = not (
            lib.llama_model_is_recurrent(self._model)
            or lib.llama_model_is_hybrid(self._model)
            or lib.llama_model_n_swa(self._model) > 0
        )
        # The batch's arrays live in numpy, filled with vector writes; the C struct points at them.
        self._token = np.zeros(n_batch, dtype=np.int32)
        self._pos = np.zeros(n_batch, dtype=np.int32)
        self._seq = np.zeros(n_batch, dtype=np.int32)
        self._n_seq = np.ones(n_batch, dtype=np.int32)
        self._logits = np.zeros(n_batch, dtype=np.int8)
        int_p = ctypes.POINTER(ctypes.c_int32)
        self._seq_ptrs = (int_p * n_batch)(*[ctypes.cast(self._seq.ctypes.data + 4 * i, int_p) for i in range(n_batch)])
        self._batch = lib.llama_batch()
        self._batch.token = self._token.ctypes.data_as(int_p)
        self._batch.embd = None
        self._batch.pos = self._pos.ctypes.data_as(int_p)
        self._batch.n_seq_id = self._n_seq.ctypes.data_as(int_p)
        self._batch.seq_id = ctypes.cast(self._seq_ptrs, ctypes.POINTER(int_p))
        self._batch.logits = self._logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))

    def _meta(self, key: str) -> str | None:
        value = ctypes.create_string_buffer(256)
        written = self._lib.llama_model_meta_val_str(self._model, key.encode(), value, len(value))
        return value.value.decode() if written >= 0 else None

    def decode(self, tokens: np.ndarray, positions: np.ndarray, seqs: np.ndarray, outputs: np.ndarray) -> np.ndarray:
        """Run one batch (every token at its position in its sequence) and return the logits of
        the tokens where ``outputs`` is true, in batch order, as a float32 array of their own.
        On failure the cache is as it was before the call (DecodeError)."""
        n = len(tokens)
        if not 0 < n <= self.n_batch:
            raise ValueError(f"a batch holds 1 to {self.n_batch} tokens, not {n}")
        self._token[:n], self._pos[:n], self._seq[:n] = tokens, positions, seqs
        self._logits[:n] = outputs
        self._batch.n_tokens = n
        code = int(self._lib.llama_decode(self._ctx, self._batch))
        if code != 0:
            raise DecodeError(code)
        n_out = int(np.count_nonzero(outputs))
        if n_out == 0:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        view = np.ctypeslib.as_array(self._lib.llama_get_logits(self._ctx), shape=(n_out, self.n_vocab))
        return view.copy()

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """``text`` as the GGUF file's own vocabulary splits it (special tokens' text stays text)."""
        lib, data = self._lib, text.encode()
        vocab = lib.llama_model_get_vocab(self._model)
        room = len(data) + 8  # a byte-level vocabulary never needs more than a token a byte, plus BOS/EOS
        tokens = (lib.llama_token * room)()
        n = int(lib.llama_tokenize(vocab, data, len(data), tokens, room, add_special, False))
        if n < 0:
            raise ValueError(f"llama.cpp needs {-n} tokens for this text, more than {room}")
        return list(tokens[:n])

    def forget(self, seq: int) -> None:
        """Drop every position of sequence ``seq`` (cells shared with others stay theirs)."""
        self._lib.llama_memory_seq_rm(self._memory, seq, -1, -1)

    def share(self, src: int, dst: int, length: int) -> None:
        """Give ``dst`` the first ``length`` positions of ``src`` (the same cells, not a copy)."""
        self._lib.llama_memory_seq_cp(self._memory, src, dst, 0, length)

    def close(self) -> None:
        if self._ctx:
            self._lib.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            self._lib.llama_model_free(self._model)
            self._model = None
