"""The CPU attention path of a decode step: the KV gather spanning exactly the longest
context's blocks (now) against the next power of two of them (before), on one engine,
decode steps alternating between the two ways so that both see the same machine and the
same batch.

    python -m nolaserve.benchmarks.cpu_attention [--seqs 64] [--context 128 300] [--steps 40]

The bundled SmolLM2-135M (fp32, CPU), ``--seqs`` greedy requests of ``--context`` to
``--context + 31`` random prompt tokens. Prints the median step of each way and their
ratio.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from nolaserve.server.build import build_engine
from nolaserve.server.config import Config
from nolaserve.server.engine.decode_step import DecodeStep
from nolaserve.server.engine.sequence import SamplingParams
from nolaserve.server.engine.step_buffers import DecodeShape, width_of


def power_of_two_width(shape_of):
    """``DecodeStep.shape_of`` as before: the width rounded up to a power of two."""
    def rounded(self, batch):
        shape = shape_of(self, batch)
        return DecodeShape(shape.rows, width_of(shape.width, self.step.max_blocks),
                           shape.lora)
    return rounded


def compare(seqs: int, context: int, steps: int) -> tuple[float, float]:
    """Median decode step (ms) now and before."""
    engine = build_engine(Config(registry_path=":memory:", max_num_seqs=seqs,
                                 max_num_batched_tokens=2048, kv_cache_bytes=1 << 30,
                                 dtype="float32"))
    rng = random.Random(0)
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    for i in range(seqs):
        engine.add_request(f"r{i}", [rng.randrange(1000, 40000) for _ in
                                     range(context + rng.randrange(32))], params)
    while engine.scheduler.num_waiting or any(
            s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running):
        engine.step()
    now = DecodeStep.shape_of
    ways = {"now": now, "before": power_of_two_width(now)}
    times: dict[str, list[float]] = {w: [] for w in ways}
    try:
        for i in range(steps):
            way = ("now", "before")[i % 2]
            DecodeStep.shape_of = ways[way]
            start = time.perf_counter()
            engine.step()
            times[way].append(time.perf_counter() - start)
    finally:
        DecodeStep.shape_of = now
    return 1e3 * statistics.median(times["now"]), 1e3 * statistics.median(times["before"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, default=64)
    p.add_argument("--context", type=int, nargs="+", default=[128, 300])
    p.add_argument("--steps", type=int, default=40, help="decode steps, half each way")
    args = p.parse_args(argv)
    print(f"SmolLM2 fp32 on CPU, {args.seqs} sequences, median decode step over "
          f"{args.steps // 2} steps each way")
    for context in args.context:
        now, before = compare(args.seqs, context, args.steps)
        print(f"  context {context}-{context + 31}: exact width {now:.1f} ms, power of two "
              f"{before:.1f} ms, now/before {now / before:.2f}")


if __name__ == "__main__":
    main()
