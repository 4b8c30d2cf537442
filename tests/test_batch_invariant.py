"""``batch_invariant``: every request's output equals the same request run alone, bit for
bit, whatever shares its steps (adapters, prompt lengths, chunked prefills, sampling)."""

import random

import pytest
from conftest import tiny_llama
from engine_helpers import greedy, make_engine, run

from nolaserve.adapters.nola import random_nola
from nolaserve.server.engine.sequence import SamplingParams

VOCAB = 300


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=VOCAB, max_position_embeddings=128)


def test_batched_outputs_equal_each_request_run_alone(model, bytebpe):
    engine = make_engine(model, bytebpe, batch_invariant=True, max_num_batched_tokens=16)
    for i in range(3):
        engine.store.register(f"a{i}", random_nola(engine.store.spec, seed=i, rank=4,
                                                   num_basis=16, coeff_std=0.5).to_bytes())
    rng = random.Random(3)
    reqs = {}
    for i in range(12):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 40))]  # chunked > 16
        params = greedy(10) if i % 3 else SamplingParams(max_tokens=10, seed=i,
                                                         ignore_eos=True)
        reqs[f"r{i}"] = (prompt, params, [None, "a0", "a1", "a2"][i % 4])
    together = run(engine, reqs)
    for rid, req in reqs.items():
        assert run(engine, {rid: req})[rid] == together[rid], rid
    assert engine.scheduler.fixed_chunks
