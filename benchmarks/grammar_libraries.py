"""Grammar libraries for structured outputs, side by side on SmolLM2's tokenizer (ADR 0012).

    python benchmarks/grammar_libraries.py [--model-dir DIR]

For xgrammar and llguidance: the time to compile a 30-field JSON schema, cold (a fresh
compiler or matcher) and cached (the same schema again), and the time to compute the token
masks of a batch of 16 rows per decode step, each row walking its own valid JSON document
token by token. Prints a table and writes a new benchmarks/results/grammar_libraries-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import write_result

BATCH = 16


def thirty_field_schema() -> dict[str, Any]:
    kinds = [
        {"type": "string"},
        {"type": "integer"},
        {"type": "number"},
        {"type": "boolean"},
        {"enum": ["red", "green", "blue"]},
        {"type": "array", "items": {"type": "string"}},
    ]
    props = {f"field_{i}": kinds[i % len(kinds)] for i in range(30)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def sample_document(schema: dict[str, Any], row: int) -> str:
    values: dict[str, Any] = {}
    for name, kind in schema["properties"].items():
        match kind.get("type"):
            case "string":
                values[name] = f"value {row}"
            case "integer":
                values[name] = row * 7
            case "number":
                values[name] = row + 0.5
            case "boolean":
                values[name] = row % 2 == 0
            case "array":
                values[name] = ["a", "b"][: row % 3]
            case _:
                values[name] = kind["enum"][row % 3]
    return json.dumps(values)


def bench_xgrammar(tokenizer: Any, vocab: int, schema: str, docs: list[list[int]]) -> dict[str, float]:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(schema, strict_mode=True)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    compiler.compile_json_schema(schema, strict_mode=True)
    cached = time.perf_counter() - start
    matchers = [xgr.GrammarMatcher(compiled) for _ in docs]
    mask = xgr.allocate_token_bitmask(len(docs), info.vocab_size)
    logits = torch.zeros(len(docs), vocab)
    steps = []
    for position in range(min(len(d) for d in docs)):
        begin = time.perf_counter()
        for row, matcher in enumerate(matchers):
            matcher.fill_next_token_bitmask(mask, row)
        xgr.apply_token_bitmask_inplace(logits, mask)
        steps.append(time.perf_counter() - begin)
        for row, matcher in enumerate(matchers):
            assert matcher.accept_token(docs[row][position])
    return {"compile_cold_s": cold, "compile_cached_s": cached, "mask_step_ms_p50": 1000 * statistics.median(steps)}


def bench_llguidance(tokenizer: Any, vocab: int, schema: str, docs: list[list[int]]) -> dict[str, float]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    first = llguidance.LLMatcher(tok, grammar)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_json_schema(schema))
    cached = time.perf_counter() - start
    matchers = [first] + [llguidance.LLMatcher(tok, grammar) for _ in docs[1:]]
    mask = llguidance.torch.allocate_token_bitmask(len(docs), tok.vocab_size)
    logits = torch.zeros(len(docs), vocab)
    steps = []
    for position in range(min(len(d) for d in docs)):
        begin = time.perf_counter()
        for row, matcher in enumerate(matchers):
            llguidance.torch.fill_next_token_bitmask(matcher, mask, row)
        llguidance.torch.apply_token_bitmask_inplace(logits, mask)
        steps.append(time.perf_counter() - begin)
        for row, matcher in enumerate(matchers):
            assert matcher.consume_token(docs[row][position]), matcher.get_error()
    return {"compile_cold_s": cold, "compile_cached_s": cached, "mask_step_ms_p50": 1000 * statistics.median(steps)}


def main() -> None:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="a directory with SmolLM2's tokenizer")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    vocab = json.loads((args.model_dir / "config.json").read_text())["vocab_size"]
    schema = thirty_field_schema()
    docs = [tokenizer.encode(sample_document(schema, row)) for row in range(BATCH)]
    text = json.dumps(schema)
    results = {
        "xgrammar": bench_xgrammar(tokenizer, vocab, text, docs),
        "llguidance": bench_llguidance(tokenizer, vocab, text, docs),
    }
    print(f"{'library':<12} {'compile cold':>13} {'compile cached':>15} {'mask step (16 rows) p50':>24}")
    for name, r in results.items():
        print(
            f"{name:<12} {r['compile_cold_s'] * 1000:>11.1f}ms {r['compile_cached_s'] * 1000:>13.2f}ms "
            f"{r['mask_step_ms_p50']:>22.2f}ms"
        )
    print(write_result("grammar_libraries", {"batch": BATCH, "fields": 30, "results": results}))


if __name__ == "__main__":
    main()
