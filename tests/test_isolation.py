"""Isolation: one tenant's adapter or request never corrupts, fails or stalls another's.
Poisoned adapters are refused at registration; NaN left in free KV blocks or in an
adapter's slot reaches nobody else; a failing request fails alone."""

import math
import random

import pytest
import torch
from conftest import tiny_llama
from engine_helpers import greedy, make_engine, run

from nolaserve.adapters.errors import AdapterNotFoundError, InvalidAdapterError, Status
from nolaserve.adapters.lora import LoraAdapter
from nolaserve.adapters.nola import random_nola
from nolaserve.adapters.spec import MAGNITUDE_BOUND, AdapterFactors, ModuleFactors
from nolaserve.server.engine.attention import servable_context
from nolaserve.server.engine.sequence import FinishReason, SamplingParams

VOCAB = 300
Q = "self_attn.q_proj"


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=VOCAB, max_position_embeddings=128)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 30))] for _ in range(n)]


def run_all(engine, requests) -> tuple[dict, dict]:
    """Like ``run`` but also returns each request's last output (errors included)."""
    tokens, last = {rid: [] for rid in requests}, {}
    for rid, (prompt, params, adapter) in requests.items():
        engine.add_request(rid, prompt, params, adapter)
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            last[out.request_id] = out
    return tokens, last


def lora(spec, value: float, scale: float = 1.0, rank: int = 2) -> bytes:
    n_in, n_out = spec.module_shapes[Q]
    factors = AdapterFactors({(0, Q): ModuleFactors(torch.full((rank, n_in), value),
                                                    torch.full((n_out, rank), value), scale)})
    return LoraAdapter([Q], {Q: (n_in, n_out)}, spec.num_layers, factors).to_bytes()


def test_poisoned_adapters_are_refused_at_registration(model, bytebpe):
    engine = make_engine(model, bytebpe)
    store, spec = engine.store, engine.store.spec
    with pytest.raises(InvalidAdapterError, match=r"layer 0 module 'self_attn.q_proj'.*bound"):
        store.register("huge-lora", lora(spec, 1e20))  # A = B = 1e20: finite, not servable
    with pytest.raises(InvalidAdapterError, match="scale"):
        store.register("huge-scale", lora(spec, 0.01, scale=1e30))
    nola = random_nola(spec, seed=1, targets=[Q], rank=4, num_basis=16)
    nola.alpha[0, 0, 0] = 3e38
    with pytest.raises(InvalidAdapterError, match=r"NOLA adapter: layer 0 .*\|A\|"):
        store.register("huge-nola", nola.to_bytes())
    nola = random_nola(spec, seed=1, targets=[Q], rank=4, num_basis=16, lora_alpha=1e300)
    with pytest.raises(InvalidAdapterError, match="scale"):
        store.register("huge-alpha", nola.to_bytes())
    assert store.registry.count() == 0
    # Just inside the bound passes; random demo adapters (coefficients ~ N(0, 1)) pass.
    edge = math.sqrt(MAGNITUDE_BOUND / 2) * 0.99
    store.register("edge", lora(spec, edge))
    store.register("demo", random_nola(spec, seed=2, rank=8, num_basis=256).to_bytes())


def test_non_finite_factors_never_enter_a_slot(model, bytebpe):
    engine = make_engine(model, bytebpe)
    store = engine.store
    store.register("a", lora(engine.store.spec, 0.01))
    real = store.factors

    def overflowing(adapter_id):  # e.g. materialized in a narrower dtype than checked
        factors = real(adapter_id)
        next(iter(factors.modules.values())).B[0, 0] = float("inf")
        return factors

    store.slots._loader = overflowing
    with pytest.raises(InvalidAdapterError, match="NaN or Inf"):
        store.acquire("a")
    engine.add_request("r", [5, 6], greedy(2), "a")
    out = [o for _ in range(20) for o in engine.step()]
    assert out[-1].finish_reason is FinishReason.ERROR and "NaN or Inf" in out[-1].error
    assert store.slots.stats.slots_used == 0


def test_an_unexpected_load_error_fails_its_request_as_internal_and_is_logged(
        model, bytebpe, caplog):
    """A load that raises what no layer expected (a CUDA OOM, a bug) is the server's fault:
    INTERNAL with the server log holding its traceback, never a client's 400; a typed
    error keeps its own status."""
    engine = make_engine(model, bytebpe)
    store = engine.store
    store.register("a", lora(engine.store.spec, 0.01))
    store.register("b", lora(engine.store.spec, 0.02))

    def broken(adapter_id):
        if adapter_id == "a":
            raise RuntimeError("CUDA out of memory")
        raise AdapterNotFoundError(f"adapter {adapter_id!r} is gone")

    store.slots._loader = broken
    engine.add_request("ra", [5, 6], greedy(2), "a")
    engine.add_request("rb", [5, 6], greedy(2), "b")
    with caplog.at_level("ERROR", logger="nolaserve.engine"):
        out = {o.request_id: o for _ in range(20) for o in engine.step() if o.finished}
    assert out["ra"].error_code is Status.INTERNAL and "CUDA out of memory" in out["ra"].error
    assert "server log has the traceback" in out["ra"].error
    assert any(r.exc_info and "CUDA out of memory" in str(r.exc_info[1]) for r in caplog.records)
    assert out["rb"].error_code is Status.NOT_FOUND and "is gone" in out["rb"].error


def test_nan_in_free_kv_blocks_never_reaches_a_later_request(model, bytebpe):
    engine, fresh = make_engine(model, bytebpe), make_engine(model, bytebpe)
    reqs = {f"r{i}": (p, greedy(6), None) for i, p in enumerate(prompts(30, seed=4))}
    run(engine, {f"w{i}": (p, greedy(3), None) for i, p in enumerate(prompts(6, seed=9))})
    bm, cache = engine.scheduler.block_manager, engine.runner.kv_cache
    assert bm.num_free_blocks == bm.num_blocks  # every block is free: poison them all
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    assert run(engine, reqs) == run(fresh, reqs)


def test_nan_logits_fail_only_their_request(model, bytebpe):
    engine, fresh = make_engine(model, bytebpe), make_engine(model, bytebpe)
    spec = engine.store.spec
    for e in (engine, fresh):
        for aid, seed in (("bad", 1), ("good", 2)):
            e.store.register(aid, random_nola(spec, seed=seed, rank=4, num_basis=16,
                                              coeff_std=0.3).to_bytes())
    slot = engine.store.pin("bad")
    for layer in range(spec.num_layers):  # bypass every check: NaN straight into the slot
        engine.store.slots.buffers(layer, Q)[1][slot].fill_(float("nan"))
    ps = prompts(4, seed=5)
    innocent = {"base": (ps[1], greedy(8), None), "good": (ps[2], greedy(8), "good"),
                "seeded": (ps[3], SamplingParams(max_tokens=8, seed=3, ignore_eos=True), "good")}
    bad = {"bad": (ps[0], SamplingParams(max_tokens=8, ignore_eos=True), "bad")}
    got, last = run_all(engine, {**bad, **innocent})
    assert last["bad"].finish_reason is FinishReason.ERROR and "'bad'" in last["bad"].error
    del got["bad"]
    assert got == run(fresh, innocent)
    assert all(len(t) == 8 for t in got.values())
    assert not engine.has_unfinished()
    # The NaN the bad request left in its freed KV blocks reaches no later request either.
    later = {f"l{i}": (p, greedy(6), None) for i, p in enumerate(prompts(8, seed=6))}
    assert run(engine, later) == run(fresh, later)


def test_a_failing_batched_draw_falls_back_to_rows_alone(model, bytebpe):
    """The engine samples a step with one batched draw read back together with its finite
    check; if that draw raises, each row is drawn alone and gets the same tokens."""
    engine, fresh = make_engine(model, bytebpe), make_engine(model, bytebpe)
    requests = {f"r{i}": (p, greedy(6), None) for i, p in enumerate(prompts(3, seed=7))}

    alone = engine.sampler.sample_ids

    def broken(logits, params, generators):  # a draw of several rows fails, one row works
        if logits.shape[0] > 1:
            raise RuntimeError("batched draw failed")
        return alone(logits, params, generators)

    engine.sampler.sample_ids = broken
    assert run(engine, requests) == run(fresh, requests)


def test_bad_request_error_names_the_adapter(model, bytebpe):
    engine = make_engine(model, bytebpe)
    engine.store.register("bad", random_nola(engine.store.spec, seed=1, rank=4,
                                             num_basis=16).to_bytes())
    slot = engine.store.pin("bad")
    engine.store.slots.buffers(0, Q)[0][slot].fill_(float("nan"))
    engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=4), "bad")
    outs = [o for _ in range(10) for o in engine.step()]
    assert outs[-1].finish_reason is FinishReason.ERROR
    assert outs[-1].error_code is Status.FAILED_PRECONDITION and "'bad'" in outs[-1].error


def test_a_step_exception_fails_only_the_request_that_raises(model, bytebpe):
    engine, fresh = make_engine(model, bytebpe), make_engine(model, bytebpe)
    execute = engine.runner.execute

    def picky(batch):  # raises whenever token 4 is in the step, as a bad input would
        if any(4 in t for t in batch.token_ids):
            raise RuntimeError("boom")
        return execute(batch)

    engine.runner.execute = picky
    reqs = {f"r{i}": (p, greedy(5), None) for i, p in enumerate(prompts(5, seed=7))}
    got, last = run_all(engine, {"bad": ([7, 4, 9], greedy(5), None), **reqs})
    assert last["bad"].error_code is Status.INTERNAL and "boom" in last["bad"].error
    del got["bad"]
    assert got == run(fresh, reqs)
    engine.runner.execute = lambda batch: (_ for _ in ()).throw(RuntimeError("always"))
    engine.add_request("x", [5, 6], greedy(2), None)
    outs = [o for _ in range(3) for o in engine.step()]
    assert outs[-1].error_code is Status.INTERNAL and "always" in outs[-1].error
    engine.runner.execute = execute  # the engine stays alive: the next request runs
    assert len(run(engine, {"y": ([5, 6], greedy(3), None)})["y"]) == 3


def test_models_paged_attention_cannot_serve_are_capped_or_refused():
    from transformers import Gemma2Config, MistralConfig, Qwen2Config

    assert servable_context(MistralConfig(sliding_window=64, max_position_embeddings=512)) == 64
    assert servable_context(MistralConfig(sliding_window=None)) == 131072
    assert servable_context(Qwen2Config(sliding_window=64, use_sliding_window=False,
                                        max_position_embeddings=512)) == 512
    with pytest.raises(ValueError, match="soft-capping"):
        servable_context(Gemma2Config())


def test_sliding_window_model_serves_with_a_capped_context(bytebpe):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        sliding_window=32)).eval()
    engine = make_engine(model, bytebpe)
    assert engine.limits.max_model_len == 32
    with pytest.raises(ValueError, match="context of 32"):
        engine.add_request("long", [5] * 30, greedy(8), None)
    assert len(run(engine, {"ok": ([5] * 20, greedy(8), None)})["ok"]) == 8
