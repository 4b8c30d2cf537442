"""Adapter-core microbenchmarks: NOLA materialization and registration latency.

    python -m nolaserve.benchmarks.adapters [--repeat 7]

Prints, for the default NOLA shape (SmolLM2-135M, q_proj + v_proj, r=8, k=l=256, about
118 million basis values), the materialization time of the C path and of the torch path
measured side by side, and the p50/p99 latency of registering NOLA adapters in a SQLite
registry on disk.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nolaserve.adapters import philox
from nolaserve.adapters.nola import random_nola
from nolaserve.adapters.registry_sqlite import SqliteRegistry
from nolaserve.adapters.spec import BaseModelSpec
from nolaserve.adapters.store import AdapterStore

SMOLLM2 = BaseModelSpec(num_layers=30, module_shapes={"self_attn.q_proj": (576, 576),
                                                      "self_attn.v_proj": (576, 192)},
                        name="SmolLM2-135M-Instruct")


def _median_seconds(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_materialize(repeat: int) -> None:
    adapter = random_nola(SMOLLM2, seed=1, rank=8, num_basis=256)
    values = sum(256 * 8 * (i + o) for i, o in SMOLLM2.module_shapes.values()) * 30
    native = philox._native
    rows = [("C", native)] if native is not None else []
    rows.append(("torch", None))
    print(f"NOLA materialization, SmolLM2 q+v, r=8, k=l=256 ({values / 1e6:.0f}M basis values),"
          f" {torch.get_num_threads()} threads")
    for name, impl in rows:
        philox._native = impl
        seconds = _median_seconds(adapter.materialize, repeat if impl else 1)
        print(f"  {name:6s} {seconds * 1e3:8.1f} ms   ({values / seconds / 1e6:.0f}M values/s)")
    philox._native = native


def bench_register(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = AdapterStore(SMOLLM2, SqliteRegistry(Path(tmp) / "r.db"), num_slots=1)
        blobs = [random_nola(SMOLLM2, seed=i).to_bytes() for i in range(n)]
        times = []
        for i, data in enumerate(blobs):
            t = time.perf_counter()
            store.register(f"nola-{i}", data)
            times.append(time.perf_counter() - t)
    times.sort()
    print(f"RegisterAdapter (store.register, NOLA {len(blobs[0]) / 1e3:.0f} KB, SQLite WAL "
          f"synchronous=FULL): p50 {times[n // 2] * 1e3:.2f} ms, "
          f"p99 {times[int(n * 0.99)] * 1e3:.2f} ms over {n}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--registrations", type=int, default=200)
    args = parser.parse_args()
    bench_materialize(args.repeat)
    bench_register(args.registrations)


if __name__ == "__main__":
    main()
