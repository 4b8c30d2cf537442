"""``batch_invariant``: every request's output equals the same request run alone, bit for
bit, whatever shares its steps (adapters, prompt lengths, chunked prefills, sampling)."""

import random

import pytest
import torch
from conftest import LINEARS, spec_of, tiny_llama
from engine_helpers import greedy, make_engine, run, step_all

from nolaserve.adapters.lora import LoraAdapter
from nolaserve.adapters.nola import random_nola
from nolaserve.adapters.slots import SlotPool
from nolaserve.adapters.spec import AdapterFactors, ModuleFactors
from nolaserve.server.build import build_engine
from nolaserve.server.config import Config
from nolaserve.server.engine.model_runner import ModelRunner, StepBatch
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


def random_lora(spec, seed: int, rank: int = 4) -> bytes:
    g = torch.Generator().manual_seed(seed)
    mods = {(i, m): ModuleFactors(torch.randn(rank, n_in, generator=g) * 0.1,
                                  torch.randn(n_out, rank, generator=g) * 0.1, 1.0)
            for i in range(spec.num_layers) for m, (n_in, n_out) in spec.module_shapes.items()}
    return LoraAdapter(target_modules=list(spec.module_shapes), num_layers=spec.num_layers,
                       module_shapes=dict(spec.module_shapes),
                       factors=AdapterFactors(mods)).to_bytes()


@pytest.fixture
def two_threads():
    """Reductions over a row of more than 32,768 floats split across CPU threads only when
    the batch has fewer rows than threads: the case a batch of one hits and a batch of
    several does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 2))
    yield
    torch.set_num_threads(threads)


def test_logprobs_equal_each_request_run_alone_over_a_large_vocabulary(bytebpe, two_threads):
    """Logprobs (the token's, its top 5, prompt logprobs) and seeded top-p draws of a
    request in a batch of base, NOLA and LoRA requests equal its solo run's bit for bit,
    over a 40,000-token vocabulary: sampling runs per request too, since on CPU the
    ``logsumexp`` of a ``[1, V]`` row is summed in another order than that of the same row
    in a ``[N, V]`` batch (a logprob moved by 1 ulp before)."""
    engine = make_engine(tiny_llama(vocab_size=40_000), bytebpe, batch_invariant=True,
                         max_num_batched_tokens=16)
    engine.store.register("nola", random_nola(engine.store.spec, seed=1, rank=4,
                                              num_basis=16, coeff_std=0.5).to_bytes())
    engine.store.register("lora", random_lora(engine.store.spec, seed=2))
    rng = random.Random(7)
    reqs = {}
    for i in range(9):
        prompt = [rng.randrange(3, 300) for _ in range(rng.randint(2, 30))]
        fields = dict(max_tokens=6, logprobs=5, prompt_logprobs=2 if i % 4 == 1 else None)
        params = greedy(**fields) if i % 3 else SamplingParams(
            **fields, seed=i, temperature=0.8, top_p=0.9, ignore_eos=True)
        reqs[f"r{i}"] = (prompt, params, [None, "nola", "lora"][i % 3])

    def outputs(batch: dict) -> dict:
        for rid, (prompt, params, adapter) in batch.items():
            engine.add_request(rid, prompt, params, adapter)
        return {rid: [(o.token_ids, o.logprobs, o.prompt_logprobs) for o in outs]
                for rid, outs in step_all(engine).items()}

    together = outputs(reqs)
    for rid, req in reqs.items():
        assert outputs({rid: req})[rid] == together[rid], rid


def logits_of(engine, reqs: dict) -> dict[str, list[torch.Tensor]]:
    """Run ``reqs`` together; each request's logits at every sampled step (rows told apart
    by their own ``SamplingParams`` object)."""
    owner = {id(params): rid for rid, (_, params, _) in reqs.items()}
    out: dict[str, list[torch.Tensor]] = {rid: [] for rid in reqs}
    sample = engine.sampler.sample_ids

    def spy(logits, params, generators):
        for row, p in zip(logits, params):
            out[owner[id(p)]].append(row.double().clone())
        return sample(logits, params, generators)

    engine.sampler.sample_ids = spy
    try:
        run(engine, reqs)
    finally:
        engine.sampler.sample_ids = sample
    return out


def alone_and_together(engine, reqs: dict) -> float:
    """The largest |logit| difference between each request run alone and all run at once,
    over the steps up to the first whose greedy tokens differ (later ones have another
    prefix)."""
    together, worst = logits_of(engine, reqs), 0.0
    for rid, req in reqs.items():
        for a, b in zip(logits_of(engine, {rid: req})[rid], together[rid]):
            worst = max(worst, float((a - b).abs().max()))
            if a.argmax() != b.argmax():
                break
    return worst


def mixed_requests(vocab: int, adapters: list[str], n: int = 8, max_tokens: int = 3) -> dict:
    rng = random.Random(5)
    return {f"r{i}": ([rng.randrange(3, vocab) for _ in range(rng.randint(1, 20))],
                      greedy(max_tokens), [None, *adapters][i % (len(adapters) + 1)])
            for i in range(n)}


def runner_logits(runner, seqs: list[tuple[list[int], int]], first_block: int,
                  decode_steps: int = 2) -> torch.Tensor:
    """``seqs`` (prompt, slot) in one prefill step then ``decode_steps`` decode steps, all
    together; logits ``[len(seqs), 1 + decode_steps, vocab]``."""
    tables, block = [], first_block
    for prompt, _ in seqs:
        n = -(-(len(prompt) + decode_steps) // runner.block_size)
        tables.append(list(range(block, block + n)))
        block += n
    steps = [StepBatch.from_seqs([(p, 0, t, s, True) for (p, s), t in zip(seqs, tables)])]
    steps += [StepBatch.from_seqs([([7 + k], len(p) + k, t, s, True)
                                   for (p, s), t in zip(seqs, tables)])
              for k in range(decode_steps)]
    return torch.stack([runner.execute(step) for step in steps], dim=1)


def test_adapter_rows_do_not_depend_on_batch_mates_beyond_rounding():
    """In float64 a batched request's logits equal its solo run's (to 1e-12) on
    demo-scale adapters (delta up to 240x the base weight) over different modules, in a
    prefill of several segments and in multi-slot decode steps: what moves adapter outputs
    with the batch in fp32 is rounding noise that the adapted network amplifies, not a row
    that gets another slot's delta or loses a module's (either moves the logits by O(1))."""
    model = tiny_llama(vocab_size=VOCAB).double()
    spec = spec_of(model, max_rank=8)
    targets = [["self_attn.q_proj", "self_attn.v_proj"], list(LINEARS),
               ["mlp.gate_proj", "mlp.down_proj"]]
    factors = {f"a{i}": random_nola(spec, seed=i, targets=t, num_basis=64).materialize()
               for i, t in enumerate(targets)}
    pool = SlotPool(spec, 3, factors.__getitem__, dtype=torch.float64)
    slots = [pool.acquire(name) for name in factors]
    runner = ModelRunner(model, spec, pool, num_kv_blocks=512, block_size=4,
                         dtype=torch.float64)
    rng = random.Random(5)
    seqs = [([rng.randrange(VOCAB) for _ in range(rng.randint(1, 20))], [-1, *slots][i % 4])
            for i in range(8)]
    together = runner_logits(runner, seqs, 0)
    alone = torch.cat([runner_logits(runner, [seq], 100 + 20 * i) for i, seq in enumerate(seqs)])
    assert (together - alone).abs().max() < 1e-12
    base = runner_logits(runner, [(p, -1) for p, _ in seqs], 300)
    moved = (alone - base).abs().amax(dim=(1, 2))  # the adapters do change the output
    assert all(m > 0.01 for m, (_, s) in zip(moved.tolist(), seqs) if s >= 0)


# SmolLM2 fp32, batched vs alone, max |logit diff| (logits ~20-35; measured 5.6e-5 for
# trained and std-0.1 adapters as for the base model, 0.56 for demo ones): operations.md
BOUND_TRAINED_LIKE = 1e-3


def test_smollm2_trained_scale_adapters_stay_within_the_documented_bound(smollm2):
    """Random NOLA adapters with the coefficient std of a trained one (0.1; delta up to
    0.9x the base weight, a `train-nola` one's 0.55x) move with their batch-mates by less
    than ``BOUND_TRAINED_LIKE``, the bound docs/operations.md states; the demo std (1.0,
    delta up to 88x) is chaotic and bounded by nothing useful."""
    engine = build_engine(Config(registry_path=":memory:", num_slots=4, max_rank=8,
                                 kv_cache_bytes=64 << 20, dtype="float32", max_num_seqs=8,
                                 max_num_batched_tokens=128))
    for i in range(3):
        engine.store.register(f"t{i}", random_nola(
            engine.store.spec, seed=i, targets=["self_attn.q_proj", "self_attn.v_proj"],
            coeff_std=0.1).to_bytes())
    assert alone_and_together(engine, mixed_requests(20_000, ["t0", "t1", "t2"])) < \
        BOUND_TRAINED_LIKE
