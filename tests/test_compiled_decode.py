"""``compile_decode``: decode-only steps through ``torch.compile`` give the eager engine's
tokens, with mixed adapters and ragged contexts, and compile at warm-up, not on the first
request. The LoRA and attention work runs in opaque custom ops that read the step context,
so a new step's metadata never recompiles the graph."""

import torch
from conftest import tiny_llama
from engine_helpers import greedy, make_engine, run

from nolaserve.adapters.nola import random_nola


def engine_with_adapters(model, tokenizer, **overrides):
    engine = make_engine(model, tokenizer, max_num_seqs=8, **overrides)
    for i in range(3):
        engine.store.register(f"n{i}", random_nola(engine.store.spec, seed=i, rank=4,
                                                   num_basis=16, coeff_std=0.5).to_bytes())
    return engine


def test_compiled_decode_gives_the_eager_tokens(bytebpe):
    model = tiny_llama(vocab_size=300)
    reqs = {f"r{i}": ([5 + i] * (2 + 3 * i), greedy(12), f"n{i % 3}" if i % 4 else None)
            for i in range(7)}  # prompts of 2..20 tokens: ragged contexts, 4 adapters mixed
    eager = run(engine_with_adapters(model, bytebpe), reqs)
    compiled_engine = engine_with_adapters(model, bytebpe, compile_decode=True)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = run(compiled_engine, reqs)
    assert compiled == eager
    # every graph was made at warm-up: the requests' decode steps only replayed them
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    assert frames > 0
