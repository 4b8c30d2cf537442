"""The decode road (fixed-shape decode steps, CUDA graphs on a GPU) against the packed eager
path, on one SmolLM2 engine, the same requests, interleaved rounds.

    python -m nolaserve.benchmarks.decode_road [--threads 2] [--rounds 2]

Scenarios: base only; every request on one NOLA adapter; the requests spread over
``--adapters`` adapters (q+v, r=8, k=l=256). The packed path is what ``enforce_eager``
runs; here the engine's ``runner.decode`` is set aside for it. Prints the best tok/s of
each side and their ratio.
"""

from __future__ import annotations

import argparse
import random

import torch

from nolaserve.adapters.nola import random_nola
from nolaserve.benchmarks.engine import TARGETS, run_batch
from nolaserve.server.build import build_engine
from nolaserve.server.config import Config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = build_engine(Config(registry_path=":memory:", num_slots=args.adapters,
                                 max_num_seqs=args.requests))
    for i in range(args.adapters):
        engine.store.register(f"a{i}", random_nola(engine.spec, seed=i,
                                                   targets=TARGETS).to_bytes())
    rng = random.Random(0)
    n = args.requests
    prompts = [[rng.randrange(100, 40000) for _ in range(rng.randint(16, 48))]
               for _ in range(n)]
    scenarios = {"base only": [None] * n, "one adapter": ["a0"] * n,
                 f"{args.adapters} adapters": [f"a{i % args.adapters}" for i in range(n)]}
    for adapters in scenarios.values():
        run_batch(engine, prompts, adapters, 4)  # loads the adapters, warms both roads
    road, best = engine.runner.decode, {}
    for _ in range(args.rounds):
        for name, adapters in scenarios.items():
            for side, decode in (("decode road", road), ("packed path", None)):
                engine.runner.decode = decode
                tps = run_batch(engine, prompts, adapters, args.max_tokens)
                best[name, side] = max(best.get((name, side), 0.0), tps)
    engine.runner.decode = road
    for name in scenarios:
        a, b = best[name, "decode road"], best[name, "packed path"]
        print(f"{name:14s} decode road {a:7.1f} tok/s  packed path {b:7.1f} tok/s  "
              f"ratio {a / b:.2f}")
    engine.close()


if __name__ == "__main__":
    main()
