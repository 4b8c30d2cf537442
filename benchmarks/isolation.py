"""Does a busy registry stall decoding? Inter-token gaps of one stream while the registry
is quiet, while its lock is held for 0.5 s, and during a registration burst.

    python -m nolaserve.benchmarks.isolation [--max-tokens 96] [--model smollm2|tiny]

``smollm2`` is the bundled model. ``tiny`` has SmolLM2's tokenizer and vocabulary but two
layers of width 64, so a step takes a few milliseconds and a stall of the step thread
shows up undiluted in the gaps: if it waited for the held lock, one gap would exceed
0.5 s.

The engine runs in-process behind ``AsyncEngine`` (the server's step thread) over a file
registry in a temporary directory (WAL, ``synchronous=FULL``: real fsyncs). The stream's
adapter is hot (pinned), so its decoding needs nothing from the registry; the step thread
never calls it. Prints the median and the longest gap between tokens per scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nolaserve.adapters.nola import random_nola
from nolaserve.adapters.registry_sqlite import SqliteRegistry
from nolaserve.server.build import build_engine
from nolaserve.server.config import Config
from nolaserve.server.engine.async_engine import AsyncEngine
from nolaserve.server.engine.model_loader import load_model
from nolaserve.server.engine.sequence import SamplingParams

TARGETS = ["self_attn.q_proj", "self_attn.v_proj"]
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, max_position_embeddings=2048)


def tiny_model(vocab_size: int):
    """A random two-layer Llama over a ``vocab_size`` vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **TINY)).eval()


def bench_model(name: str):
    """The bundled SmolLM2 (``smollm2``) or ``tiny_model`` over its vocabulary (``tiny``),
    and the tokenizer."""
    model, tokenizer = load_model()
    return (tiny_model(len(tokenizer)) if name == "tiny" else model), tokenizer


async def gaps(aengine: AsyncEngine, prompt: list[int], max_tokens: int,
               during=None) -> list[float]:
    """Seconds between consecutive tokens of one greedy stream; ``during()`` starts on a
    thread after the first token."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    stamps, job = [], None
    async for _ in aengine.generate(prompt, params, "hot"):
        stamps.append(time.perf_counter())
        if job is None and during is not None:
            job = asyncio.ensure_future(asyncio.to_thread(during))
    if job is not None:
        await job
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--hold", type=float, default=0.5, help="seconds the lock is held")
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    args = parser.parse_args()
    model, tokenizer = bench_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        registry = SqliteRegistry(Path(tmp) / "registry.db")
        engine = build_engine(Config(registry_path=str(Path(tmp) / "registry.db"), max_rank=8),
                              model=model, tokenizer=tokenizer, registry=registry)
        spec = engine.store.spec
        blobs = [random_nola(spec, seed=i, targets=TARGETS, coeff_std=0.1).to_bytes()
                 for i in range(40)]
        engine.store.register("hot", blobs[0])
        engine.store.pin("hot")
        prompt = engine.tokenizer("The capital of France is")["input_ids"]

        def hold() -> None:
            with registry._lock:  # what a registration's transaction holds, fsync included
                time.sleep(args.hold)

        def burst() -> None:
            for i, blob in enumerate(blobs[1:], 1):
                engine.store.register(f"burst-{i}", blob)

        async def run() -> dict[str, list[float]]:
            aengine = AsyncEngine(engine)
            try:
                await gaps(aengine, prompt, 8)  # warm-up
                return {"quiet registry": await gaps(aengine, prompt, args.max_tokens),
                        f"registry lock held {args.hold} s": await gaps(
                            aengine, prompt, args.max_tokens, hold),
                        f"{len(blobs) - 1} registrations": await gaps(
                            aengine, prompt, args.max_tokens, burst)}
            finally:
                aengine.stop()

        results = asyncio.run(run())
        registry.close()
    print(f"one stream of {args.max_tokens} tokens on {args.model}, adapter pinned")
    print(f"{'scenario':30s} {'median gap ms':>14s} {'longest gap ms':>15s}")
    for name, g in results.items():
        print(f"{name:30s} {1e3 * statistics.median(g):14.1f} {1e3 * max(g):15.1f}")


if __name__ == "__main__":
    main()
