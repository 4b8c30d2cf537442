"""How many regeneration threads decode can live with: base-model decode tok/s while NOLA
adapters are regenerated non-stop on ``materialize_threads`` threads, side by side.

    python -m nolaserve.benchmarks.regen_budget [--threads 0 1 2] [--requests 16]

SmolLM2-135M (fp32), ``--requests`` base-model requests of 32 random prompt tokens and
``--max-tokens`` new tokens submitted at once; meanwhile one loader thread regenerates the
default NOLA shape (q+v, r=8, k=l=256) in a loop through a pool of N threads (N = 0: no
regeneration). Prints decode tok/s, its ratio to N = 0 and regenerations per second.
"""

from __future__ import annotations

import argparse
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from nolaserve.benchmarks.adapters import SMOLLM2
from nolaserve.benchmarks.compare import make_adapter, run_engine
from nolaserve.server.build import build_engine
from nolaserve.server.config import Config


def regenerate_until(stop: threading.Event, threads: int, done: list[int]) -> None:
    adapter = make_adapter(SMOLLM2, 1)
    with ThreadPoolExecutor(threads, thread_name_prefix="nola-regen") as pool:
        while not stop.is_set():
            adapter.materialize("cpu", pool)
            done[0] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    engine = build_engine(Config(registry_path=":memory:", num_slots=8, max_rank=8,
                                 max_num_seqs=64, kv_cache_bytes=256 << 20))
    prompts = [[100 + (i * 31 + j) % 30000 for j in range(32)] for i in range(args.requests)]
    run_engine(engine, prompts[:4], [None] * 4, 4)  # warm-up
    print(f"{args.requests} base requests x {args.max_tokens} tokens, "
          f"{torch.get_num_threads()} torch threads in the step")
    print(f"{'regen threads':>13s} {'decode tok/s':>12s} {'x none':>7s} {'regens/s':>9s}")
    base = None
    for n in args.threads:
        stop, done = threading.Event(), [0]
        loader = threading.Thread(target=regenerate_until, args=(stop, n, done))
        if n:
            loader.start()
        t = time.perf_counter()
        tps, _ = run_engine(engine, prompts, [None] * len(prompts), args.max_tokens)
        seconds = time.perf_counter() - t
        stop.set()
        if n:
            loader.join()
        base = base or tps
        print(f"{n:13d} {tps:12.1f} {tps / base:7.2f} {done[0] / seconds:9.1f}")


if __name__ == "__main__":
    main()
