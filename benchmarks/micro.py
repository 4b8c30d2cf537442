"""Microbenchmarks: add_lora backends, NOLA materialization by shape, RegisterAdapter over
gRPC, and resident memory per registered NOLA adapter.

    python -m nolaserve.benchmarks.micro [--adapters 10000] [--skip memory ops ...]

- ``memory`` (first, in a fresh process): VmRSS before and after registering
  ``--adapters`` NOLA adapters of the default shape (SQLite registry on disk, as the server
  keeps it, and in memory), then after loading them all into the host cache
  (``store.parsed``); bytes per adapter against the coefficient bytes (alpha + beta).
- ``ops``: ``add_lora`` on SmolLM2's q_proj (576 -> 576), r=8, 64 slots, fp32, by backend
  (reference only up to 64 tokens), adapter spread and token count; median us per call
  with the ``LoraBatch`` built outside the timing (it is built once per engine step).
- ``materialize``: NOLA materialization time for a few (in, out, r, k) points.
- ``register``: RegisterAdapter p50/p99 for NOLA through the real gRPC server in process
  (``server.app.start``, engine from ``build_engine``, SQLite registry on disk).
- ``detok``: the step thread's detokenization, us per output token (SmolLM2's tokenizer,
  64 streams of text and of random ids, fed a token at a time): the tokenizer's Rust
  ``DecodeStream`` against the Python window of two ``decode`` calls, side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import re
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from nolaserve.adapters.nola import random_nola
from nolaserve.adapters.ops import (
    LoraBatch,
    add_lora,
    choose_backend,
    gather_bmm,
    reference,
    segment,
)
from nolaserve.adapters.registry_sqlite import SqliteRegistry
from nolaserve.adapters.spec import BaseModelSpec
from nolaserve.adapters.store import AdapterStore
from nolaserve.benchmarks.adapters import SMOLLM2
from nolaserve.benchmarks.engine import TARGETS

SPREADS = ("distinct", "uniform", "skewed", "identical")
BACKENDS = {"reference": reference, "segment": segment, "gather_bmm": gather_bmm, "auto": None}


def rss_bytes() -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text)[1]) * 1024


def _per_call_seconds(fn, min_seconds: float = 0.2, min_reps: int = 5) -> float:
    fn()  # warm-up
    times, start = [], time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def token_slots(spread: str, tokens: int, slots: int, gen: torch.Generator) -> torch.Tensor:
    """distinct: token i on slot i mod S; uniform: random slots; skewed: half the tokens on
    slot 0, the rest uniform; identical: every token on slot 0."""
    if spread == "distinct":
        return torch.arange(tokens) % slots
    if spread == "uniform":
        return torch.randint(0, slots, (tokens,), generator=gen)
    if spread == "skewed":
        out = torch.randint(0, slots, (tokens,), generator=gen)
        out[torch.randperm(tokens, generator=gen)[: (tokens + 1) // 2]] = 0
        return out
    return torch.zeros(tokens, dtype=torch.long)


def bench_ops(token_counts: list[int]) -> None:
    n_in, n_out, r, slots = 576, 576, 8, 64
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(slots, r, n_in, generator=gen)
    B = torch.randn(slots, n_out, r, generator=gen)
    scale = torch.full((slots,), 2.0)
    names = list(BACKENDS)
    print(f"\nadd_lora, q_proj {n_in} -> {n_out}, r={r}, {slots} slots, fp32, "
          f"{torch.get_num_threads()} threads: median us per call (LoraBatch prebuilt)")
    print(f"{'spread':10s} {'tokens':>6s} " + " ".join(f"{n:>10s}" for n in names)
          + f" {'auto picks':>11s}")
    for spread in SPREADS:
        for t in token_counts:
            x, y = torch.randn(t, n_in, generator=gen), torch.zeros(t, n_out)
            batch = LoraBatch.from_token_slot(token_slots(spread, t, slots, gen))
            cells = []
            for name, fn in BACKENDS.items():
                if name == "reference" and t > 64:
                    cells.append(f"{'-':>10s}")
                    continue
                s = _per_call_seconds(lambda fn=fn: add_lora(y, x, A, B, scale, batch,
                                                             backend=fn))
                cells.append(f"{s * 1e6:10.1f}")
            picked = choose_backend(x, batch).__name__
            print(f"{spread:10s} {t:6d} " + " ".join(cells) + f" {picked:>11s}")


def bench_materialize(repeat: int) -> None:
    """(label, layers, {module: (in, out)}, r, k)."""
    smol = {"q": (576, 576), "v": (576, 192)}
    points = [("SmolLM2 q+v (default)", 30, smol, 8, 256),
              ("SmolLM2 q+v", 30, smol, 4, 256), ("SmolLM2 q+v", 30, smol, 16, 256),
              ("SmolLM2 q+v", 30, smol, 8, 64), ("SmolLM2 q+v", 30, smol, 8, 1024),
              ("SmolLM2 all 7 linears", 30, {"q": (576, 576), "k": (576, 192),
               "v": (576, 192), "o": (576, 576), "gate": (576, 1536), "up": (576, 1536),
               "down": (1536, 576)}, 8, 256),
              ("7B-like q+v (4096^2), 1 layer", 1, {"q": (4096, 4096), "v": (4096, 4096)},
               8, 256)]
    print(f"\nNOLA materialization by shape, {torch.get_num_threads()} threads, median of "
          f"{repeat}")
    print(f"{'shape':32s} {'r':>3s} {'k=l':>5s} {'values':>8s} {'ms':>8s} {'Gvalues/s':>10s}")
    for label, layers, shapes, r, k in points:
        spec = BaseModelSpec(layers, shapes, max_rank=64, max_num_basis=4096)
        adapter = random_nola(spec, seed=1, rank=r, num_basis=k)
        values = layers * sum(k * r * (i + o) for i, o in shapes.values())
        times = []
        adapter.materialize()
        for _ in range(repeat):
            t = time.perf_counter()
            adapter.materialize()
            times.append(time.perf_counter() - t)
        s = statistics.median(times)
        print(f"{label:32s} {r:3d} {k:5d} {values / 1e6:7.0f}M {s * 1e3:8.1f} "
              f"{values / s / 1e9:10.2f}")


def bench_memory(n: int, registry_kind: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = ":memory:" if registry_kind == "memory" else str(Path(tmp) / "r.db")
        store = AdapterStore(SMOLLM2, SqliteRegistry(path), num_slots=1)

        def make(i: int) -> bytes:
            return random_nola(SMOLLM2, seed=i, targets=TARGETS, coeff_std=0.1).to_bytes()

        for i in range(20):  # warm-up: SQLite, allocator, parse path
            store.register(f"w{i}", make(i))
            store.parsed(f"w{i}")
        coeff = store.parsed("w0").nbytes
        gc.collect()
        before, t = rss_bytes(), time.perf_counter()
        for i in range(n):
            store.register(f"nola-{i}", make(i))
        gc.collect()
        registered, seconds = rss_bytes(), time.perf_counter() - t
        for i in range(n):
            store.parsed(f"nola-{i}")
        gc.collect()
        loaded, entries = rss_bytes(), store.stats.host.entries
        blob = len(make(0))
        print(f"\n{n:,} NOLA adapters (q+v, r=8, k=l=256; coefficients {coeff:,} B, file "
              f"{blob:,} B), registry {registry_kind}, registered in {seconds:.1f} s")
        for what, rss in (("after register", registered), ("after loading into host cache",
                                                           loaded)):
            per = (rss - before) / n
            print(f"  {what:30s}: RSS +{(rss - before) / 2**20:8.1f} MiB, "
                  f"{per:10,.0f} B/adapter = {per / coeff:5.3f}x coefficient bytes")
        print(f"  host cache entries after loading: {entries:,}")
        store.close()
        del store
        gc.collect()


def bench_register_grpc(n: int) -> None:
    from nolaserve.clients.client import Client
    from nolaserve.server.app import start
    from nolaserve.server.build import build_engine
    from nolaserve.server.config import Config

    with tempfile.TemporaryDirectory() as tmp:
        config = Config(registry_path=str(Path(tmp) / "r.db"), port=0, metrics_port=0)
        engine = build_engine(config)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        server = asyncio.run_coroutine_threadsafe(start(config, engine), loop).result()
        spec = engine.store.spec
        blobs = [random_nola(spec, seed=i, targets=TARGETS, coeff_std=0.1).to_bytes()
                 for i in range(n + 10)]
        times = []
        with Client(f"127.0.0.1:{server.port}") as client:
            for i, data in enumerate(blobs):
                t = time.perf_counter()
                client.register_adapter(f"nola-{i}", data)
                if i >= 10:  # the first 10 warm up the channel
                    times.append(time.perf_counter() - t)
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        engine.store.close()
    times.sort()
    print(f"\nRegisterAdapter over gRPC (in-process server, SQLite WAL on disk, "
          f"synchronous=FULL), NOLA {len(blobs[0]):,} B: p50 {times[n // 2] * 1e3:.2f} ms, "
          f"p99 {times[min(n - 1, int(n * 0.99))] * 1e3:.2f} ms, "
          f"max {times[-1] * 1e3:.2f} ms over {n}")


class _DecodeOnly:
    """A tokenizer seen only through ``decode``: the detokenizer's Python window path."""

    def __init__(self, tokenizer) -> None:
        self.decode = tokenizer.decode


def bench_detok(tokens: int = 128, streams: int = 64) -> None:
    from nolaserve.benchmarks.overhead import smollm2_tokenizer
    from nolaserve.server.engine.detokenizer import IncrementalDetokenizer

    tok = smollm2_tokenizer()
    text = tok.encode("Streaming détokenization: naïve café, 中文, emoji 😀 and code `x += 1`. "
                      * 8, add_special_tokens=False)
    gen = torch.Generator().manual_seed(0)
    kinds = {"text": [text[i:i + tokens] for i in range(streams)],
             "random ids": torch.randint(0, tok.vocab_size, (streams, tokens),
                                         generator=gen).tolist()}
    print(f"\ndetokenization, us per token ({streams} streams x {tokens} tokens, one at a time)")
    for kind, outputs in kinds.items():
        us = {}
        for path, t in (("stream", tok), ("window", _DecodeOnly(tok))):
            start = time.perf_counter()
            for ids in outputs:
                detok = IncrementalDetokenizer(t, [])
                for i in ids:
                    detok.add([i])
                detok.flush()
            us[path] = 1e6 * (time.perf_counter() - start) / (streams * tokens)
        print(f"  {kind:10s}  DecodeStream {us['stream']:.2f}  window {us['window']:.2f}  "
              f"({us['window'] / us['stream']:.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=10_000)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256, 1024])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--registrations", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default); 1 is steadier on a busy host")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["memory", "ops", "materialize", "register", "detok"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if "memory" not in args.skip:
        for kind in ("disk", "memory"):
            bench_memory(args.adapters, kind)
    if "ops" not in args.skip:
        bench_ops(args.tokens)
    if "materialize" not in args.skip:
        bench_materialize(args.repeat)
    if "register" not in args.skip:
        bench_register_grpc(args.registrations)
    if "detok" not in args.skip:
        bench_detok()


if __name__ == "__main__":
    main()
