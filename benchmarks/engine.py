"""In-process engine throughput on SmolLM2, base model against many adapters, side by side.

    python -m nolaserve.benchmarks.engine [--requests 64] [--max-tokens 32]

One engine, the same prompts and ``max_tokens``, greedy, EOS ignored. Scenarios:
base only; every request on one NOLA adapter; 64 distinct NOLA adapters (uniform);
1,000 registered NOLA adapters over 64 slots (uniform, so slots churn and cold adapters
are regenerated). NOLA adapters target q_proj and v_proj, r=8, k=l=256 (the default shape).
Prints generated tokens/s and the ratio to base only, measured in the same run.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from nolaserve.adapters.nola import random_nola
from nolaserve.server.build import build_engine
from nolaserve.server.config import Config
from nolaserve.server.engine.engine import Engine
from nolaserve.server.engine.sequence import SamplingParams

TARGETS = ["self_attn.q_proj", "self_attn.v_proj"]


def run_batch(engine: Engine, prompts: list[list[int]], adapters: list[str | None],
              max_tokens: int) -> float:
    """Generated tokens per second for all requests submitted at once."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start, generated = time.perf_counter(), 0
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters)):
        engine.add_request(f"b{i}", prompt, params, adapter)
    while engine.has_unfinished():
        generated += sum(len(o.token_ids) for o in engine.step())
    return generated / (time.perf_counter() - start)


def workload_parser(description: str) -> argparse.ArgumentParser:
    """The options of the engine workload, shared with ``benchmarks.compare``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=(16, 48))
    parser.add_argument("--registered", type=int, default=1000)
    return parser


def main() -> None:
    args = workload_parser(__doc__.splitlines()[0]).parse_args()
    config = Config(registry_path=":memory:", num_slots=64, max_rank=8,
                    max_num_seqs=args.requests, max_num_batched_tokens=1024,
                    kv_cache_bytes=256 << 20)
    engine = build_engine(config)
    rng = random.Random(0)
    vocab = engine.runner.vocab_size
    prompts = [[rng.randrange(100, vocab) for _ in range(rng.randint(*args.prompt_tokens))]
               for _ in range(args.requests)]
    t = time.perf_counter()
    for i in range(args.registered):
        engine.store.register(f"nola-{i}", random_nola(engine.store.spec, seed=i, rank=8,
                                                       num_basis=256, targets=TARGETS,
                                                       coeff_std=0.1).to_bytes())
    print(f"registered {args.registered} NOLA adapters in {time.perf_counter() - t:.1f} s; "
          f"{args.requests} requests x {args.max_tokens} tokens, prompts "
          f"{args.prompt_tokens[0]}-{args.prompt_tokens[1]} tokens, "
          f"{torch.get_num_threads()} threads")
    n = args.requests
    scenarios = {
        "base only": [None] * n,
        "1 adapter": ["nola-0"] * n,
        "64 distinct adapters": [f"nola-{i % 64}" for i in range(n)],
        f"{args.registered} adapters / 64 slots": [f"nola-{rng.randrange(args.registered)}"
                                                    for _ in range(n)],
    }
    run_batch(engine, prompts[:8], [None] * 8, 4)  # warm-up
    results = {}
    for name, adapters in scenarios.items():
        if name == "64 distinct adapters":  # load the 64 adapters outside the timing
            run_batch(engine, prompts[:64], adapters[:64], 1)
        results[name] = run_batch(engine, prompts, adapters, args.max_tokens)
    base = results["base only"]
    print(f"{'scenario':34s} {'tok/s':>8s} {'x base':>7s}")
    for name, tps in results.items():
        print(f"{name:34s} {tps:8.1f} {tps / base:7.2f}")
    stats = engine.store.stats.slots
    print(f"slot pool: {stats.misses} loads, {stats.evictions} evictions, "
          f"{stats.materialize_seconds:.1f} s materializing")


if __name__ == "__main__":
    main()
