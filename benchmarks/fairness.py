"""Does one adapter's burst delay another adapter's request? One short request's latency
alone, and submitted during a burst of another adapter's long requests that overfills the
KV cache, side by side in one run.

    python -m nolaserve.benchmarks.fairness [--burst 32] [--kv-blocks 64] [--model tiny|smollm2]

The scheduler ranks sequences by start-time fair queuing across adapters, so the short
request, its adapter's first, lands among the burst's first requests, ahead of the burst's
queued ones, is not the burst's preemption victim, and, when the burst's long requests keep
the KV cache full (``--burst 64 --burst-tokens 200``), displaces the burst's lowest-ranked
running request instead of waiting for blocks to free. The third row sends the same request
on the burst's own adapter: that is where plain first come, first served (vLLM's default)
puts a late request of any adapter, behind the whole burst and first in line for preemption.
``tiny`` has SmolLM2's tokenizer and vocabulary but two layers of width 64. The engine runs
in-process (``Engine.step`` in a loop); both adapters are pinned.

Then the scheduler's host work per step with a long queue (``queue_cost``: 256 running,
2,000 waiting, no model), over 1, 64 and 1,000 adapters.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from nolaserve.adapters.nola import random_nola
from nolaserve.benchmarks.isolation import TARGETS, bench_model
from nolaserve.server.build import build_engine
from nolaserve.server.config import Config
from nolaserve.server.engine.block_manager import BlockManager
from nolaserve.server.engine.engine import Engine
from nolaserve.server.engine.memory import bytes_per_block
from nolaserve.server.engine.scheduler import Scheduler
from nolaserve.server.engine.sequence import FinishReason, SamplingParams, Sequence


def probe_latency(engine: Engine, prompt: list[int], burst: int, burst_tokens: int,
                  adapter: str | None) -> tuple[float, int, int]:
    """Seconds and steps from submitting the probe (16 greedy tokens on ``adapter``) to its
    end, after ``burst`` requests on adapter "a" have filled the KV cache (none if 0), and
    how many times the probe was preempted."""
    long = SamplingParams(max_tokens=burst_tokens, temperature=0.0, ignore_eos=True)
    for i in range(burst):
        engine.add_request(f"burst-{i}", prompt, long, "a")
    for _ in range(4 if burst else 0):  # the burst is running and holds the KV cache
        engine.step()
    engine.add_request("probe", prompt, SamplingParams(max_tokens=16, temperature=0.0,
                                                       ignore_eos=True), adapter)
    probe = engine.requests["probe"].seq
    start, steps, preempted, done = time.perf_counter(), 0, 0, False
    while not done:
        computed = probe.num_computed_tokens
        outputs = engine.step()
        steps += 1
        preempted += probe.num_computed_tokens < computed
        done = any(o.request_id == "probe" and o.finished for o in outputs)
    seconds = time.perf_counter() - start
    while engine.has_unfinished():
        engine.step()
    return seconds, steps, preempted


def queue_cost(num_adapters: int, waiting: int = 2000, steps: int = 300) -> float:
    """Milliseconds per step of ``Scheduler.schedule`` and the finishes that follow it, with
    256 running and ``waiting`` queued sequences (32-token prompts, 8-64 tokens each)
    spread over ``num_adapters`` adapters; the queue is topped up after each step."""
    rng = random.Random(0)
    sched = Scheduler(BlockManager(200_000, 16), 256, 2048)
    added = 0

    def add() -> None:
        nonlocal added
        sched.add(Sequence(f"r{added}", list(range(32)),
                           SamplingParams(max_tokens=rng.randint(8, 64)),
                           f"a{rng.randrange(num_adapters)}"))
        added += 1

    for _ in range(waiting + 256):
        add()
    spent = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        for item in sched.schedule().scheduled:
            seq, samples = item.seq, item.samples
            seq.num_computed_tokens += item.num_new_tokens
            if samples:
                seq.output_token_ids.append(0)
                if len(seq.output_token_ids) >= seq.params.max_tokens:
                    sched.finish(seq, FinishReason.LENGTH)
        spent += time.perf_counter() - start
        while sched.num_waiting < waiting:
            add()
    return 1e3 * spent / steps


def register_pinned(engine: Engine, names: tuple[str, ...] = ("a", "b")) -> None:
    """A random NOLA adapter under each name, pinned to a slot."""
    for i, name in enumerate(names):
        blob = random_nola(engine.store.spec, seed=i, targets=TARGETS, coeff_std=0.1)
        engine.store.register(name, blob.to_bytes())
        engine.store.pin(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=32, help="requests in the burst")
    parser.add_argument("--burst-tokens", type=int, default=96, help="max_tokens of each")
    parser.add_argument("--kv-blocks", type=int, default=64, help="KV-cache size in blocks")
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="tiny")
    args = parser.parse_args()
    model, tokenizer = bench_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        block = bytes_per_block(model.config, 16, next(model.parameters()).dtype)
        config = Config(registry_path=str(Path(tmp) / "registry.db"), max_rank=8,
                        block_size=16, kv_cache_bytes=(args.kv_blocks + 1) * block)
        engine = build_engine(config, model=model, tokenizer=tokenizer)
        register_pinned(engine)
        prompt = engine.tokenizer("The capital of France is")["input_ids"]
        probe_latency(engine, prompt, 0, args.burst_tokens, "b")  # warm-up
        rows = {"alone": probe_latency(engine, prompt, 0, args.burst_tokens, "b"),
                "own adapter, during the burst": probe_latency(
                    engine, prompt, args.burst, args.burst_tokens, "b"),
                "burst's adapter (FCFS place)": probe_latency(
                    engine, prompt, args.burst, args.burst_tokens, "a")}
        engine.close()
    print(f"{args.model}: {args.burst} requests x {args.burst_tokens} tokens on adapter a, "
          f"KV cache {args.kv_blocks} blocks of {config.block_size}; probe: 16 tokens")
    print(f"{'probe':32s} {'seconds':>8s} {'steps':>6s} {'preempted':>10s} {'x alone':>8s}")
    alone = rows["alone"][0]
    for name, (seconds, steps, preempted) in rows.items():
        print(f"{name:32s} {seconds:8.3f} {steps:6d} {preempted:10d} {seconds / alone:8.1f}")
    print("\nscheduler host work, 256 running and 2,000 waiting (no model)")
    for num_adapters in (1, 64, 1000):
        print(f"{num_adapters:5d} adapters: {queue_cost(num_adapters):.3f} ms per step")


if __name__ == "__main__":
    main()
