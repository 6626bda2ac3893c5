"""A Llama-family Hugging Face directory written as a GGUF file that llama.cpp loads: the
metadata llama.cpp reads, the byte-level BPE vocabulary, and every weight in the file type asked
for (norms stay float32, as llama.cpp's own converter keeps them).

The tensor names come from gguf-py's own map (``gguf.get_tensor_name_map``), the quantisation
from ``gguf.quants``; the query and key rows are reordered from transformers' rotary layout
(halves) to llama.cpp's (interleaved pairs), the inverse of what GGUF readers undo.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmos.errors import InvalidRequestError

LLAMA_MODEL_TYPES = frozenset({"llama"})


@dataclass(frozen=True)
class GgufType:
    """One GGUF file type: the type of its matrices and the file-type tag llama.cpp reports."""

    matrix_type: str  # a gguf.GGMLQuantizationType name
    file_type: str  # a gguf.LlamaFileType name


GGUF_TYPES: dict[str, GgufType] = {
    "f32": GgufType("F32", "ALL_F32"),  # lossless: what llama.cpp's own quantize tool starts from
    "f16": GgufType("F16", "MOSTLY_F16"),
    "bf16": GgufType("BF16", "MOSTLY_BF16"),
    "q8_0": GgufType("Q8_0", "MOSTLY_Q8_0"),
}


def _refuse(message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param="format", code="unsupported_export")


def check_llama_dir(model_dir: Path) -> None:
    """400 ``unsupported_export`` unless the directory is a model this writer holds exactly: a
    Llama architecture with plain rotary positions and a byte-level BPE tokenizer llama.cpp knows."""
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") not in LLAMA_MODEL_TYPES:
        raise _refuse(
            f"GGUF export covers Llama-family models; this one is {config.get('model_type')!r} "
            f"({(config.get('architectures') or ['?'])[0]})"
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise _refuse(f"GGUF export covers plain rotary positions, not {rope.get('rope_type') or rope.get('type')!r}")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise _refuse("GGUF export covers Llama models without attention or MLP biases")
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise _refuse("GGUF export needs the model's tokenizer.json (a byte-level BPE tokenizer)")
    tokenizer = json.loads(tokenizer_file.read_text())
    if tokenizer.get("model", {}).get("type") != "BPE" or tokenizer.get("model", {}).get("byte_fallback"):
        raise _refuse("GGUF export covers byte-level BPE tokenizers (GPT-2 style), not this one")
    pre_tokenizer_name(tokenizer)


# What llama.cpp calls each pre-tokenizer it implements, by the structure of tokenizer.json's
# ``pre_tokenizer`` (llama.cpp's converter tells them apart by hashing a test text's tokens instead).
_PRE_TOKENIZERS: dict[str, str] = {
    json.dumps([["ByteLevel", True]]): "gpt-2",
    json.dumps([["Digits", True], ["ByteLevel", True]]): "smollm",
}


def pre_tokenizer_name(tokenizer: dict[str, Any]) -> str:
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    shape = json.dumps(
        [[s.get("type"), s.get("use_regex", s.get("individual_digits"))] for s in steps if isinstance(s, dict)]
    )
    name = _PRE_TOKENIZERS.get(shape)
    if name is None:
        raise _refuse(f"the tokenizer's pre-tokenizer {shape} has no llama.cpp equivalent this export knows")
    return name


def write_llama_gguf(model_dir: Path, path: Path, gguf_type: str, *, name: str) -> Path:
    """Write ``model_dir`` (checked by ``check_llama_dir``) to ``path`` as GGUF ``gguf_type``."""
    import gguf

    check_llama_dir(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    rope = config.get("rope_parameters") or {}
    kind = GGUF_TYPES[gguf_type]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        writer.add_name(name)
        writer.add_context_length(int(config["max_position_embeddings"]))
        writer.add_embedding_length(int(config["hidden_size"]))
        writer.add_block_count(int(config["num_hidden_layers"]))
        writer.add_feed_forward_length(int(config["intermediate_size"]))
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0))
        writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
        writer.add_vocab_size(int(config["vocab_size"]))
        writer.add_file_type(int(getattr(gguf.LlamaFileType, kind.file_type)))
        _add_vocabulary(writer, model_dir, int(config["vocab_size"]))
        tensor_names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config["num_hidden_layers"]))
        matrix_type = getattr(gguf.GGMLQuantizationType, kind.matrix_type)
        tied = bool(config.get("tie_word_embeddings"))
        for hf_name, weights in _weights(model_dir):
            if tied and hf_name == "lm_head.weight":
                continue  # llama.cpp reads the output projection from token_embd when output is absent
            gguf_name = tensor_names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise _refuse(f"the weight {hf_name} has no place in a Llama GGUF file")
            if hf_name.endswith("q_proj.weight"):
                weights = _rotary_interleaved(weights, heads)
            elif hf_name.endswith("k_proj.weight"):
                weights = _rotary_interleaved(weights, kv_heads)
            data, qtype = _encode(weights, matrix_type)
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


def _weights(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of the directory's safetensors files as float32, one at a time."""
    import torch
    from safetensors import safe_open

    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield key, f.get_tensor(key).to(torch.float32).numpy()


def _rotary_interleaved(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of each head from transformers' halves layout to llama.cpp's interleaved pairs."""
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _encode(weights: np.ndarray, matrix_type: Any) -> tuple[np.ndarray, Any]:
    """Vectors (norms) stay float32; a matrix whose rows do not fill whole blocks of the type
    falls back to float16, as llama.cpp's converter does."""
    import gguf
    from gguf.quants import quantize

    if weights.ndim < 2:
        return weights.astype(np.float32), gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[matrix_type][0]
    if weights.shape[-1] % block:
        matrix_type = gguf.GGMLQuantizationType.F16
    return quantize(weights, matrix_type), matrix_type


def _add_vocabulary(writer: Any, model_dir: Path, vocab_size: int) -> None:
    """The tokenizer as llama.cpp's ``gpt2`` model: tokens by id, their types, merges, special
    ids, whether a BOS is added (as the Hugging Face tokenizer does it) and the chat template."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text())
    hf = AutoTokenizer.from_pretrained(model_dir)
    by_id = {i: t for t, i in hf.get_vocab().items()}
    added = {t.content: t for t in hf.added_tokens_decoder.values()}
    if max(by_id) >= vocab_size:
        raise _refuse(f"the tokenizer has ids up to {max(by_id)} but the model only {vocab_size} embeddings")
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:  # embeddings the tokenizer never produces (a padded vocabulary)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    adds_bos = hf.bos_token_id is not None and hf("a").input_ids[:1] == [hf.bos_token_id]
    special.add_special_token["bos"] = adds_bos
    special.add_special_token["eos"] = False
    if special.chat_template is None and getattr(hf, "chat_template", None):
        special.chat_template = hf.chat_template
    special.add_to_gguf(writer, quiet=True)
