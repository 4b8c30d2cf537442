"""Fair queuing across adapters, through the engine: a request on its own adapter runs
through another adapter's burst that overfills the KV cache as it runs alone, a burst of
short requests or of long ones that keep the cache full (counted in steps and
preemptions, never seconds)."""

from __future__ import annotations

import torch
from engine_helpers import make_engine

from nolaserve.benchmarks import fairness
from nolaserve.server.engine.memory import bytes_per_block


def test_a_request_on_its_own_adapter_runs_through_another_adapters_burst(llama):
    block = bytes_per_block(llama.config, 4, torch.float32)
    engine = make_engine(llama, None, kv_cache_bytes=21 * block)  # 20 blocks of 4 tokens
    engine.tokenizer = type("T", (), {"decode": lambda self, ids, **kw: ""})()
    try:
        fairness.register_pinned(engine)
        prompt = list(range(1, 6))
        alone = fairness.probe_latency(engine, prompt, 0, 24, "b")[1:]
        assert alone == (16, 0)
        assert fairness.probe_latency(engine, prompt, 8, 24, "b")[1:] == alone
        # a burst of long requests keeps the KV cache full at every step's end: the probe
        # displaces the burst's lowest-ranked running request (26 steps when it waited)
        assert fairness.probe_latency(engine, prompt, 16, 40, "b")[1:] == alone
        steps, preempted = fairness.probe_latency(engine, prompt, 8, 24, "a")[1:]
        assert steps > 16  # on the burst's adapter it queues behind the burst, as in FCFS
        assert engine.stats.preemptions > 0  # the bursts did overfill the KV cache
    finally:
        engine.close()
