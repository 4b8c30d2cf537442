"""Engine correctness on CPU fp32 against references we did not write: transformers
``generate`` greedy and peft's ``PeftModel.generate``."""

import copy
import random

import pytest
import torch
from conftest import tiny_llama
from engine_helpers import assert_same_or_tie, greedy, hf_greedy, make_engine, run
from peft import LoraConfig, get_peft_model

from nolaserve.adapters.errors import (
    AdapterNotFoundError,
    IncompatibleAdapterError,
    InvalidRequestError,
    RequestTooLargeError,
)
from nolaserve.adapters.nola import random_nola
from nolaserve.adapters.peft_import import import_peft
from nolaserve.server.engine.sequence import FinishReason, SamplingParams

VOCAB = 300


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=VOCAB, max_position_embeddings=128)


def prompts(n: int, seed: int = 0, lo: int = 2, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def test_base_model_matches_hf_generate(model, bytebpe):
    engine = make_engine(model, bytebpe)
    ps = prompts(8)
    got = run(engine, {f"r{i}": (p, greedy(32), None) for i, p in enumerate(ps)})
    for i, p in enumerate(ps):
        assert_same_or_tie(got[f"r{i}"], *hf_greedy(model, p, 32))


def peft_adapter(model, tmp_path, seed: int, targets: list[str], r: int = 4):
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    peft_model.save_pretrained(tmp_path / f"a{seed}")
    return peft_model.eval(), import_peft(tmp_path / f"a{seed}").to_bytes()


def test_lora_matches_peft_generate(model, bytebpe, tmp_path):
    engine = make_engine(model, bytebpe)
    ps = prompts(2, seed=1)
    for seed, targets in [(1, ["q_proj", "v_proj"]), (2, ["o_proj", "down_proj", "k_proj"])]:
        peft_model, data = peft_adapter(model, tmp_path, seed, targets)
        engine.store.register(f"lora{seed}", data)
        got = run(engine, {f"p{i}": (p, greedy(16), f"lora{seed}") for i, p in enumerate(ps)})
        for i, p in enumerate(ps):
            assert_same_or_tie(got[f"p{i}"], *hf_greedy(peft_model, p, 16))


def test_mixed_batch_gives_each_request_its_tokens_alone(model, bytebpe, tmp_path):
    engine = make_engine(model, bytebpe, num_slots=10)
    targets = [["q_proj", "v_proj"], ["gate_proj", "up_proj"], ["o_proj"]]
    for seed in range(8):
        engine.store.register(f"a{seed}", peft_adapter(model, tmp_path, seed, targets[seed % 3])[1])
    reqs = {f"r{i}": (p, greedy(12), f"a{i}" if i < 8 else None)
            for i, p in enumerate(prompts(10, seed=2))}
    together = run(engine, reqs)
    for rid, req in reqs.items():
        assert run(engine, {rid: req})[rid] == together[rid], rid


def test_nola_matches_peft_lora_of_its_factors(model, bytebpe):
    engine = make_engine(model, bytebpe)
    nola = random_nola(engine.store.spec, seed=7, targets=["self_attn.q_proj", "self_attn.v_proj"],
                       rank=4, num_basis=32, lora_alpha=8.0, coeff_std=0.5)
    engine.store.register("nola", nola.to_bytes())
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for (i, name), f in nola.materialize().modules.items():
            lin = peft_model.base_model.model.model.layers[i].get_submodule(name)
            lin.lora_A["default"].weight.copy_(f.A)
            lin.lora_B["default"].weight.copy_(f.B)
    ps = prompts(3, seed=3)
    got = run(engine, {f"n{i}": (p, greedy(16), "nola") for i, p in enumerate(ps)})
    base = run(engine, {"b": (ps[0], greedy(16), None)})["b"]
    assert got["n0"] != base, "the adapter should change the output"
    for i, p in enumerate(ps):
        assert_same_or_tie(got[f"n{i}"], *hf_greedy(peft_model.eval(), p, 16))


def test_bad_requests_are_rejected_and_engine_keeps_serving(model, bytebpe):
    engine = make_engine(model, bytebpe, max_tokens_limit=64)
    other = random_nola(type(engine.store.spec)(2, {"self_attn.q_proj": (64, 32)}), seed=1)
    bad = [  # (prompt, sampling fields, adapter, error, match)
        ([], {}, None, InvalidRequestError, "empty"),
        ([5] * 200, {}, None, InvalidRequestError, "limit"),
        ([5] * 100, {"max_tokens": 60}, None, InvalidRequestError, "context"),
        ([5], {"max_tokens": 0}, None, InvalidRequestError, "max_tokens"),
        ([5], {"max_tokens": 65}, None, InvalidRequestError, "max_tokens"),
        ([5], {"temperature": -1}, None, InvalidRequestError, "temperature"),
        ([5], {"temperature": float("nan")}, None, InvalidRequestError, "temperature"),
        ([5], {"top_p": 0}, None, InvalidRequestError, "top_p"),
        ([5], {"top_p": 1.5}, None, InvalidRequestError, "top_p"),
        ([5], {}, "nope", AdapterNotFoundError, "nope"),
    ]
    for prompt, fields, adapter, error, match in bad:
        with pytest.raises(error, match=match):  # (at construction, as vLLM's, if it can)
            engine.add_request("x", prompt, SamplingParams(**fields), adapter)
        params = SamplingParams()  # a field set after construction is checked again
        for name, value in fields.items():
            setattr(params, name, value)
        with pytest.raises(error, match=match):
            engine.add_request("x", prompt, params, adapter)
    with pytest.raises(IncompatibleAdapterError, match="shape"):
        engine.store.register("other", other.to_bytes())
    small = make_engine(model, bytebpe, kv_cache_bytes=16 << 10)
    with pytest.raises(RequestTooLargeError, match="KV cache holds"):
        small.add_request("x", [5] * 60, SamplingParams(max_tokens=60), None)
    assert not engine.has_unfinished()
    assert len(run(engine, {"ok": ([5, 6, 7], greedy(4), None)})["ok"]) == 4


def test_stop_string_limits_at_and_over_the_bound(model, bytebpe):
    """At most 16 stop strings of 1..256 characters (characters, not bytes: "é" * 256 is
    fine): the bound is accepted and runs, one more string or character is refused."""
    engine = make_engine(model, bytebpe)
    at_bound = [["x" * 256] * 16, ["é" * 256], [f"\x01stop{i}" for i in range(16)]]
    over = [["x"] * 17, ["x" * 257], ["é" * 257], ["ok", ""], ["x" * 256] * 17]
    for stop in over:
        with pytest.raises(InvalidRequestError, match="stop"):
            engine.add_request("x", [5, 6], SamplingParams(max_tokens=2, stop=stop), None)
    assert not engine.has_unfinished()
    requests = {f"ok{i}": ([5, 6], SamplingParams(max_tokens=3, temperature=0, stop=stop,
                                                   ignore_eos=True), None)
                for i, stop in enumerate(at_bound)}
    assert all(len(t) == 3 for t in run(engine, requests).values())


def test_stress_everything_ends_and_nothing_leaks(model, bytebpe):
    engine = make_engine(model, bytebpe, num_slots=3, kv_cache_bytes=48 << 10,
                         max_num_seqs=12)  # 48 KV blocks: not enough for 12 seqs, preempts
    spec, rng = engine.store.spec, random.Random(5)
    preempted, schedule = [], engine.scheduler.schedule

    def spy():
        out = schedule()
        preempted.extend(out.preempted)
        return out

    engine.scheduler.schedule = spy
    ids = [f"n{i}" for i in range(8)]
    for i, aid in enumerate(ids):
        engine.store.register(aid, random_nola(spec, seed=i, rank=4, num_basis=16,
                                               targets=["self_attn.q_proj"]).to_bytes())
    finished: dict[str, FinishReason] = {}
    for i, p in enumerate(prompts(200, seed=6, lo=1, hi=30)):
        params = SamplingParams(max_tokens=rng.randint(1, 8), temperature=rng.choice([0, 1]),
                                seed=i)
        engine.add_request(f"r{i}", p, params, rng.choice(ids + [None]))
    for _ in range(5000):
        if not engine.has_unfinished():
            break
        for rid in rng.sample(sorted(engine.requests), k=min(2, len(engine.requests))):
            if rng.random() < 0.05:
                out = engine.abort(rid)
                finished[rid] = out.finish_reason
        for out in engine.step():
            if out.finished:
                assert out.error is None, out.error
                finished[out.request_id] = out.finish_reason
    assert len(finished) == 200 and FinishReason.CANCELLED in finished.values()
    assert preempted, "the KV cache is small enough that some sequences must be preempted"
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    table = engine.store.slots.table
    assert all(table.refcount(s) == 0 for s in range(table.num_slots))
    assert engine.store.slots.stats.misses > 3  # slots churned over cold adapters
