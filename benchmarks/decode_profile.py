"""Where a decode step's time goes: the torch engine's runner decoding ``rows`` requests of
SmolLM2-135M-Instruct (or ``--model``) under ``torch.profiler``, its operators grouped by kind.

    python benchmarks/decode_profile.py [--rows 1 16 64] [--seconds 3]
    python benchmarks/decode_profile.py --model qwen2.5-coder-0.5b-instruct --rows 1 16  # benchmarks/models.py pulls it

For each row count: ``rows`` requests with the same 128-token prompt (the prefix cache off, so
each has its own cache) decode with ``ignore_eos``; once every row has its first token the
profiler records the steps for ``--seconds``. Each operator's self time (on the engine thread,
which waits for its intra-op workers, so a parallel product counts once, at its wall time) falls
in one group: the weight products, attention, copies and dtype casts, sampling, and other tensor
work (norms, rotary embedding, activations). What the operators leave of the step's wall time is Python: the runner's
scheduling, streaming and bookkeeping. Prints a table per row count; writes
benchmarks/results/decode_profile-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import MODEL, PROMPT_TOKENS, ROOT, InProcessRunner, load_runner, write_result

# The lean step's weight products are oneDNN linear calls; its attention over many rows is batched
# products (bmm) with the scores scaled, masked and soft-maxed in float32 (lean_decode).
GROUPS: dict[str, tuple[str, ...]] = {
    "weight products": ("mkldnn::_linear_pointwise", "mm", "addmm", "linear", "_int_mm", "_weight_int8pack_mm"),
    "attention": ("bmm", "baddbmm", "_softmax", "softmax", "masked_fill", "masked_fill_", "_scaled_dot_product"),
    "copies and casts": ("copy_", "_to_copy", "cat", "clone", "index_copy", "index_put", "slice_scatter"),
    "sampling": ("argmax", "topk", "sort", "multinomial", "log_softmax", "cumsum", "gather"),
}


def group_of(op: str) -> str:
    name = op.removeprefix("aten::")
    for group, keys in GROUPS.items():
        if name in keys or op in keys:
            return group
    return "other tensor work"


class EngineThreadProfile:
    """``torch.profiler`` records the operators of the thread that starts it, so it is started
    and stopped on the engine's own thread, between two of its steps."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.execute = runner._execute
        self.wanted = True
        self.stopped = threading.Event()
        self.prof: Any = None
        self.wall = 0.0
        self.tokens = 0
        self._t0 = 0.0
        self._tokens0 = 0

    def _step(self) -> None:
        if self.wanted and self.prof is None:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.prof.__enter__()
            self._t0, self._tokens0 = time.perf_counter(), self.runner.tokens_generated
        elif not self.wanted and self.prof is not None and not self.stopped.is_set():
            self.wall = time.perf_counter() - self._t0
            self.tokens = self.runner.tokens_generated - self._tokens0
            self.prof.__exit__(None, None, None)
            self.stopped.set()
        self.execute()

    def __enter__(self) -> EngineThreadProfile:
        self.runner._execute = self._step
        return self

    def __exit__(self, *exc: object) -> None:
        self.wanted = False
        assert self.stopped.wait(timeout=600)
        self.runner._execute = self.execute


def profile_rows(
    loaded: InProcessRunner, rows: int, max_tokens: int, seconds: float, model: str = MODEL
) -> dict[str, Any]:
    from llmos.engine.protocol import GenerationDelta, GenerationRequest, SamplingParams

    runner, prompt = loaded.runner, loaded.prompt()
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    started = threading.Semaphore(0)
    ended = threading.Semaphore(0)

    def sink() -> Any:
        first = [True]

        def on_delta(delta: GenerationDelta) -> None:
            if first[0]:
                first[0] = False
                started.release()
            if delta.finish_reason is not None:
                ended.release()

        return on_delta

    for i in range(rows):
        runner.submit(GenerationRequest(f"r{rows}-{i}", model, list(prompt), params), sink())
    for _ in range(rows):
        assert started.acquire(timeout=600)
    with EngineThreadProfile(runner) as recording:
        time.sleep(seconds)
    wall, tokens, prof = recording.wall, recording.tokens, recording.prof
    steps = tokens // rows  # every row decodes a token a step
    for _ in range(rows):
        assert ended.acquire(timeout=600)
    groups: dict[str, float] = dict.fromkeys([*GROUPS, "other tensor work"], 0.0)
    top: list[tuple[str, float]] = []
    for event in prof.key_averages():
        if event.key.startswith(("aten::", "mkldnn", "onednn", "llmos")) or "::" in event.key:
            self_s = event.self_cpu_time_total / 1e6
            groups[group_of(event.key)] += self_s
            top.append((event.key, self_s))
    ops = sum(groups.values())
    top.sort(key=lambda kv: -kv[1])
    return {
        "rows": rows,
        "steps": steps,
        "step_ms": 1e3 * wall / max(steps, 1),
        "tokens_per_s": tokens / wall,
        "groups_ms_per_step": {k: 1e3 * v / max(steps, 1) for k, v in groups.items()},
        "outside_operators_ms_per_step": 1e3 * max(wall - ops, 0.0) / max(steps, 1),
        "top_operators_ms_per_step": {k: 1e3 * v / max(steps, 1) for k, v in top[:12]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=3.0, help="profiled time of each row count")
    parser.add_argument("--max-tokens", type=int, default=0, help="tokens each row decodes (0: enough for --seconds)")
    parser.add_argument("--model", default=MODEL, help="a registered model of --home (benchmarks/models.py)")
    parser.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16"], default=None, help="weights' dtype (default: the server's)"
    )
    parser.add_argument("--home", type=Path, default=ROOT / ".cache" / "bench-home")
    parser.add_argument("--out", type=Path, default=None, help="result file (default: a new dated one; never replaced)")
    args = parser.parse_args()

    loaded = load_runner(args.home, args.model, dtype=args.dtype)
    results = []
    try:
        for rows in args.rows:
            max_tokens = args.max_tokens or int(60 * args.seconds) + 64
            results.append(profile_rows(loaded, rows, max_tokens, args.seconds, args.model))
    finally:
        loaded.runner.close()
    names = [*GROUPS, "other tensor work"]
    print(f"{args.model} ({loaded.dtype}), ms per decode step")
    print(f"{'rows':>5} {'step':>7} {'tok/s':>7} " + " ".join(f"{n[:14]:>14}" for n in names) + f" {'outside ops':>12}")
    for r in results:
        cells = " ".join(f"{r['groups_ms_per_step'][n]:>14.2f}" for n in names)
        outside = r["outside_operators_ms_per_step"]
        print(f"{r['rows']:>5} {r['step_ms']:>7.1f} {r['tokens_per_s']:>7.1f} {cells} {outside:>12.2f}")
    for r in results:
        print(
            f"top operators at {r['rows']} rows (ms/step):",
            {k: round(v, 2) for k, v in r["top_operators_ms_per_step"].items()},
        )
    result = {
        "model": args.model,
        "dtype": loaded.dtype,
        "prompt_tokens": PROMPT_TOKENS,
        "rows": results,
    }
    write_result("decode_profile", result, args.out)  # prints where


if __name__ == "__main__":
    main()
