"""How serving throughput grows with engine replicas (Ray cluster mode): a discrete-event simulation
whose replicas run the service curve measured from the real engine on this machine and whose
router is the platform's own (``llmos.cluster.routing.choose_replica``).

    python benchmarks/replica_scaling.py [--replicas 1 2 4 8] [--clients 1 8 32 128]
                                         [--curve RESULT.json | --decode-profile RESULT.json] [--servers 1]

1. The service curve (skipped with ``--curve``, which reuses an earlier result's): the torch
   engine's runner of SmolLM2-135M-Instruct, in this process, decodes ``rows`` requests at once
   (a 128-token prompt each, the prefix cache off, ``ignore_eos``); once every row has its first
   token, the decode step's wall time is read off the tokens generated in ``--seconds``. The
   prefill pass is timed too: ``k`` prompts submitted at once to the idle runner, until each has
   its first token. ``--decode-profile`` takes the decode steps from a result of
   ``benchmarks/decode_profile.py`` (the same engine and model, measured the same way) instead,
   and measures only the prefill passes: a quiet earlier measurement is worth more than one taken
   while the machine is busy. A profile taken on another CPU (model or instruction sets) or in
   another dtype is refused.
2. The simulation: ``clients`` closed-loop clients, each sending its next request (the same prompt,
   ``--output-tokens`` tokens to generate on average, each drawn evenly from half to one and a half
   times that) when its previous answer ends. Each request is routed
   by ``choose_replica`` on the replicas' requests in flight, as each API server sees them: its
   own exactly, the other servers' (``--servers`` above 1, the clients spread over them) as the
   replica last reported them, polled every ``routing.POLL_S``. A replica is the engine's loop: an
   iteration prefills the waiting prompts (at most ``prefill_chunk_tokens``) and then takes one
   decode step of every running row (at most the runner's row cap), each part costing what the
   measured curves say (linear between the measured row counts, beyond the last by its slope).
   Throughput is the tokens generated over the simulated time after a warm-up.

What it assumes, printed with the table and kept in the result: each replica has cores of its own,
as many and as fast as this machine's two, and nothing else runs on them; the API servers,
network and Ray's transport add nothing (a stream's delta is one Ray object); every request is
alike (no prefix sharing, no early EOS). Writes benchmarks/results/replica_scaling-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import itertools

from benchmarks.harness import MODEL, PROMPT_TOKENS, ROOT, load_runner, percentile, run_facts, write_result
from llmos.cluster.routing import POLL_S, ReplicaLoad, choose_replica


# -- 1. the service curve, measured --------------------------------------------------------------
def refuse_foreign_profile(profile: dict[str, Any], curve: dict[str, Any], name: str) -> None:
    """Exit unless ``profile``'s decode steps were measured here: the same CPU model and
    instruction sets, model and dtype as the prefill just measured (a step of another CPU or
    dtype differs by several times, and the figures would say "this machine")."""
    here = run_facts()["cpu"]
    there = profile.get("run", {}).get("cpu", {})
    differences = [
        f"{what}: {theirs!r} there, {ours!r} here"
        for what, theirs, ours in (
            ("CPU", there.get("model"), here["model"]),
            ("CPU flags", there.get("flags"), here["flags"]),
            ("model", profile.get("model"), curve["model"]),
            ("dtype", profile.get("dtype"), curve["dtype"]),
        )
        if theirs != ours
    ]
    if differences:
        raise SystemExit(f"{name} was not measured on this machine as this run is: " + "; ".join(differences))


def measure_curve(
    rows_list: Sequence[int], prefill_counts: Sequence[int], seconds: float, home: Path
) -> dict[str, Any]:
    from llmos.engine.protocol import GenerationDelta, GenerationRequest, SamplingParams

    loaded = load_runner(home)
    runner, base = loaded.runner, loaded.config
    prompt = loaded.prompt()
    serial = iter(range(10**9))

    def submit(count: int, max_tokens: int) -> tuple[list[str], threading.Semaphore, threading.Semaphore]:
        first, ended = threading.Semaphore(0), threading.Semaphore(0)
        ids = []
        for _ in range(count):
            seen = [False]

            def on_delta(delta: GenerationDelta, seen: list[bool] = seen) -> None:
                if not seen[0]:
                    seen[0] = True
                    first.release()
                if delta.finish_reason is not None:
                    ended.release()

            request_id = f"curve-{next(serial)}"
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            runner.submit(GenerationRequest(request_id, MODEL, list(prompt), params), on_delta)
            ids.append(request_id)
        return ids, first, ended

    def wait(semaphore: threading.Semaphore, count: int) -> None:
        for _ in range(count):
            assert semaphore.acquire(timeout=600)

    decode, prefill = [], []
    try:
        wait(submit(1, 1)[2], 1)  # warm-up: the first pass builds caches and kernels
        for k in prefill_counts:
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                _, first, ended = submit(k, 1)
                wait(first, k)
                times.append(time.perf_counter() - t0)
                wait(ended, k)
            prefill.append({"prompts": k, "tokens": k * PROMPT_TOKENS, "ms": 1e3 * statistics.median(times)})
        for rows in rows_list:
            ids, first, ended = submit(rows, 100_000)
            wait(first, rows)
            tokens0, t0 = runner.tokens_generated, time.perf_counter()
            time.sleep(seconds)
            tokens, wall = runner.tokens_generated - tokens0, time.perf_counter() - t0
            for request_id in ids:
                runner.abort(request_id)
            wait(ended, rows)
            decode.append({"rows": rows, "step_ms": 1e3 * wall * rows / tokens, "tokens_per_s": tokens / wall})
    finally:
        runner.close()
    return {
        "model": MODEL,
        "dtype": loaded.dtype,
        "prompt_tokens": PROMPT_TOKENS,
        "max_rows": runner.max_batch_size,  # the runner's own row cap (torch: step_token_budget - 1)
        "prefill_chunk_tokens": base.prefill_chunk_tokens,
        "decode": decode,
        "prefill": prefill,
    }


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float:
    """Linear between the measured points; beyond the last (or before the first) by the nearest slope."""
    if len(points) == 1:
        return points[0][1] * x / points[0][0]
    pairs = list(itertools.pairwise(points))
    (x0, y0), (x1, y1) = next(((a, b) for a, b in pairs if x <= b[0]), pairs[-1])
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


# -- 2. the simulation ---------------------------------------------------------------------------
@dataclass
class Request:
    client: int
    server: int
    sent: float
    left: int
    first_token: float | None = None


@dataclass
class SimReplica:
    replica_id: str
    waiting: deque[Request] = field(default_factory=deque)
    running: list[Request] = field(default_factory=list)
    busy: bool = False
    by_server: dict[int, int] = field(default_factory=dict)
    """Requests in flight by the API server that sent them (what the replica reports)."""
    reported: dict[int, int] = field(default_factory=dict)
    """``by_server`` as of the last poll."""


class Simulation:
    def __init__(self, curve: dict[str, Any], replicas: int, clients: int, servers: int, output_tokens: int) -> None:
        self.step = [(float(d["rows"]), d["step_ms"] / 1e3) for d in curve["decode"]]
        self.prefill = [(float(p["tokens"]), p["ms"] / 1e3) for p in curve["prefill"]]
        self.max_rows = curve["max_rows"]
        self.chunk = curve["prefill_chunk_tokens"]
        self.replicas = [SimReplica(f"replica-{i}") for i in range(replicas)]
        self.clients, self.servers, self.output_tokens = clients, servers, output_tokens
        self.lengths = random.Random(0)  # the same draws for every replica count: like for like
        self.events: list[tuple[float, int, str, Any]] = []
        self.serial = 0
        self.now = 0.0
        self.tokens: list[tuple[float, int]] = []
        self.ttfts: list[tuple[float, float]] = []

    def at(self, when: float, kind: str, what: Any = None) -> None:
        self.serial += 1
        heapq.heappush(self.events, (when, self.serial, kind, what))

    def load(self, replica: SimReplica, server: int) -> int:
        """Its requests in flight as ``server`` sees them: its own now, the others' as last polled."""
        others = sum(n for s, n in replica.reported.items() if s != server)
        return replica.by_server.get(server, 0) + others

    def send(self, client: int) -> None:
        server = client % self.servers
        loads = [ReplicaLoad(r.replica_id, self.load(r, server)) for r in self.replicas]
        chosen = choose_replica(loads, None, overload=4)
        replica = next(r for r in self.replicas if r.replica_id == chosen.replica_id)
        replica.by_server[server] = replica.by_server.get(server, 0) + 1
        # Answers of one length would keep the clients in lockstep (all ending on one step), so
        # each draws its length from half to one and a half times the mean.
        length = self.lengths.randint(self.output_tokens // 2, self.output_tokens * 3 // 2)
        replica.waiting.append(Request(client, server, self.now, length))
        if not replica.busy:
            self.iterate(replica)

    def iterate(self, replica: SimReplica) -> None:
        """One engine iteration: a prefill pass of the waiting prompts that fit, then a decode step."""
        joining: list[Request] = []
        budget = self.chunk
        while replica.waiting and len(replica.running) + len(joining) < self.max_rows and budget >= PROMPT_TOKENS:
            joining.append(replica.waiting.popleft())
            budget -= PROMPT_TOKENS
        if not joining and not replica.running:
            replica.busy = False
            return
        replica.busy = True
        cost = interpolate(self.prefill, len(joining) * PROMPT_TOKENS) if joining else 0.0
        if replica.running:
            cost += interpolate(self.step, len(replica.running))
        self.at(self.now + cost, "iteration", (replica, joining))

    def iterated(self, replica: SimReplica, joining: list[Request]) -> None:
        stepped = list(replica.running)
        for request in joining:  # the prefill pass gives each its first token
            request.first_token = self.now
            self.ttfts.append((self.now, self.now - request.sent))
        for request in [*stepped, *joining]:
            request.left -= 1
        self.tokens.append((self.now, len(stepped) + len(joining)))
        replica.running = [r for r in [*stepped, *joining] if r.left > 0]
        for request in [*stepped, *joining]:
            if request.left <= 0:
                replica.by_server[request.server] -= 1
                self.at(self.now, "send", request.client)
        self.iterate(replica)

    def run(self, duration: float, warmup: float) -> dict[str, float]:
        for client in range(self.clients):
            self.at(client * 1e-3, "send", client)  # a millisecond apart, as clients never start at once
        self.at(POLL_S, "poll")
        while self.events:
            self.now, _, kind, what = heapq.heappop(self.events)
            if self.now > duration:
                break
            if kind == "send":
                self.send(what)
            elif kind == "iteration":
                self.iterated(*what)
            elif kind == "poll":
                for replica in self.replicas:
                    replica.reported = dict(replica.by_server)
                self.at(self.now + POLL_S, "poll")
        measured = duration - warmup
        tokens = sum(n for t, n in self.tokens if t >= warmup)
        ttfts = [v for t, v in self.ttfts if t >= warmup]
        return {
            "tokens_per_s": tokens / measured,
            "ttft_p50_ms": 1e3 * percentile(ttfts, 0.5) if ttfts else float("nan"),
            "ttft_p95_ms": 1e3 * percentile(ttfts, 0.95) if ttfts else float("nan"),
        }


ASSUMES = (
    "each replica has cores of its own, as many and as fast as the measuring machine's, and nothing else on them",
    "the API servers, the network and Ray's transport add no time",
    "one prompt length; answers drawn evenly from half to 1.5x --output-tokens; no prefix sharing",
    "closed-loop clients: each sends its next request when its previous answer ends",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--servers", type=int, default=1, help="API servers the clients are spread over")
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], help="measured batch rows")
    parser.add_argument("--prefill", type=int, nargs="+", default=[1, 2, 4], help="prompts per measured prefill")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time of each row count")
    parser.add_argument("--duration", type=float, default=300.0, help="simulated seconds of each run")
    parser.add_argument("--warmup", type=float, default=30.0, help="simulated seconds left out of the figures")
    parser.add_argument("--curve", type=Path, help="a result of this script whose measured curve to reuse")
    parser.add_argument("--decode-profile", type=Path, help="a decode_profile result whose decode steps to use")
    parser.add_argument("--home", type=Path, default=ROOT / ".cache" / "bench-home")
    parser.add_argument("--out", type=Path, default=None, help="result file (default: a new dated one; never replaced)")
    args = parser.parse_args()

    if args.curve:
        curve = json.loads(args.curve.read_text())["curve"]
        if "max_rows" not in curve:  # earlier results capped rows at max_batch_size, a llama.cpp setting
            raise SystemExit(f"{args.curve.name} predates the runner's row cap in the curve: measure it again")
    elif args.decode_profile:
        profile = json.loads(args.decode_profile.read_text())
        curve = measure_curve([], args.prefill, args.seconds, args.home)
        refuse_foreign_profile(profile, curve, args.decode_profile.name)
        steps = [{k: r[k] for k in ("rows", "step_ms", "tokens_per_s")} for r in profile["rows"]]
        curve |= {"decode": steps, "decode_from": {"file": args.decode_profile.name, "run": profile["run"]}}
    else:
        curve = measure_curve(args.rows, args.prefill, args.seconds, args.home)
    print(f"service curve of one replica ({curve['model']}, {curve['dtype']}, this machine):")
    for d in curve["decode"]:
        print(f"  decode {d['rows']:>3} rows: {d['step_ms']:7.1f} ms a step, {d['tokens_per_s']:7.1f} tokens/s")
    for p in curve["prefill"]:
        print(f"  prefill {p['prompts']} x {curve['prompt_tokens']} tokens: {p['ms']:7.1f} ms")
    runs = []
    for replicas in args.replicas:
        for clients in args.clients:
            sim = Simulation(curve, replicas, clients, args.servers, args.output_tokens)
            runs.append({"replicas": replicas, "clients": clients, **sim.run(args.duration, args.warmup)})
    single = {r["clients"]: r["tokens_per_s"] for r in runs if r["replicas"] == args.replicas[0]}
    print(f"\nsimulated, {args.servers} API server(s), {args.output_tokens} tokens a request:")
    print(
        f"{'replicas':>8} {'clients':>7} {'tokens/s':>9} {'x ' + str(args.replicas[0]):>6} {'TTFT p50':>9} {'p95':>9}"
    )
    for r in runs:
        gain = r["tokens_per_s"] / single[r["clients"]]
        r["speedup"] = gain
        print(
            f"{r['replicas']:>8} {r['clients']:>7} {r['tokens_per_s']:>9.1f} {gain:>6.2f}"
            f" {r['ttft_p50_ms']:>7.0f}ms {r['ttft_p95_ms']:>7.0f}ms"
        )
    print("assumes: " + "; ".join(ASSUMES))
    result = {
        "curve": curve,
        "servers": args.servers,
        "output_tokens": args.output_tokens,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "poll_s": POLL_S,
        "assumes": list(ASSUMES),
        "runs": runs,
    }
    write_result("replica_scaling", result, args.out)


if __name__ == "__main__":
    main()
