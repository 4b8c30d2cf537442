"""How often does batching change a greedy output? Each request run alone vs the same
requests run together, on SmolLM2, with the top-2 logit gap where they part.

    python -m nolaserve.benchmarks.batch_invariance [--requests 32] [--max-tokens 32]

Batch composition changes the floating-point reduction order (matmul blocking over the
step's token count, attention padding to the longest context, LoRA segments), so logits
differ in the last bits. Greedy outputs then differ only where the top two logits of the
solo run are within that noise: a near-tie. For every request that differs, this prints
the first differing token and the solo run's top-2 gap there. Scenarios: base model only,
and half the requests on 8 random NOLA adapters; each also with ``batch_invariant``, where
the outputs must equal the solo runs exactly; tokens/s of each batched run show its cost.
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
SUBJECTS = ["the ocean", "a small robot", "Paris", "prime numbers", "an old lighthouse",
            "coffee", "the moon landing", "a chess opening", "rainforests", "a violin",
            "winter in Norway", "the printing press", "honeybees", "a city at night",
            "volcanoes", "the first computer"]
FORMS = ["Write one sentence about {}.", "Tell me a fact about {}.",
         "Describe {} to a child.", "What is surprising about {}?"]


def prompts(engine: Engine, n: int) -> list[list[int]]:
    rng = random.Random(0)
    texts = [rng.choice(FORMS).format(rng.choice(SUBJECTS)) for _ in range(n)]
    tok = engine.tokenizer
    return [tok(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                        add_generation_prompt=True),
                add_special_tokens=False)["input_ids"] for t in texts]


def solo(engine: Engine, prompt: list[int], adapter: str | None,
         max_tokens: int) -> tuple[list[int], list[float]]:
    """Tokens of the request run alone and the top-2 logit gap at every step."""
    gaps: list[float] = []
    sample = engine.sampler.sample

    def spy(logits, params, generators):
        top2 = logits[0].float().topk(2).values
        gaps.append(float(top2[0] - top2[1]))
        return sample(logits, params, generators)

    engine.sampler.sample = spy
    try:
        tokens = run(engine, [(prompt, adapter)], max_tokens)[0][0]
    finally:
        engine.sampler.sample = sample
    return tokens, gaps


def run(engine: Engine, reqs: list[tuple[list[int], str | None]],
        max_tokens: int) -> tuple[list[list[int]], float]:
    """Every request at once; outputs in order and generated tokens per second."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(reqs))}
    for i, (prompt, adapter) in enumerate(reqs):
        engine.add_request(f"r{i}", prompt, params, adapter)
    start = time.perf_counter()
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.token_ids
    seconds = time.perf_counter() - start
    return [out[f"r{i}"] for i in range(len(reqs))], len(reqs) * max_tokens / seconds


def compare(name: str, together: list[list[int]], alone: list[tuple[list[int], list[float]]],
            tps: float) -> None:
    parted = []
    for got, (want, gaps) in zip(together, alone):
        step = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), None)
        if step is not None:
            parted.append((step, gaps[step]))
    n = len(together)
    detail = ", ".join(f"token {s} (gap {g:.3g})" for s, g in sorted(parted)) or "-"
    print(f"{name:34s} {tps:7.1f} tok/s  {len(parted):3d}/{n} differ: {detail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    engines = {mode: build_engine(Config(registry_path=":memory:", max_rank=8,
                                         max_num_seqs=args.requests, batch_invariant=mode,
                                         max_num_batched_tokens=1024))
               for mode in (False, True)}
    for engine in engines.values():
        for i in range(8):
            engine.store.register(f"nola-{i}", random_nola(
                engine.store.spec, seed=i, targets=TARGETS, coeff_std=0.1).to_bytes())
    engine = engines[False]
    ps = prompts(engine, args.requests)
    scenarios = {"base model": [(p, None) for p in ps],
                 "half on 8 NOLA adapters": [(p, f"nola-{i % 8}" if i % 2 else None)
                                             for i, p in enumerate(ps)]}
    print(f"SmolLM2, {args.requests} requests x {args.max_tokens} greedy tokens, "
          f"{torch.get_num_threads()} threads")
    for name, reqs in scenarios.items():
        alone = [solo(engine, p, a, args.max_tokens) for p, a in reqs]
        gaps = sorted(g for _, gs in alone for g in gs)
        small = sum(g < 1e-2 for g in gaps)
        print(f"{name}: {len(gaps)} solo steps, {small} with a top-2 gap < 0.01, "
              f"smallest {gaps[0]:.3g}")
        together, tps = run(engine, reqs, args.max_tokens)
        compare("  batched", together, alone, tps)
        together, tps = run(engines[True], reqs, args.max_tokens)
        compare("  batched, batch_invariant", together, alone, tps)


if __name__ == "__main__":
    main()
