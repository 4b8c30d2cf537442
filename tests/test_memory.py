"""KV cache sized from memory, the warm-up steps and what `nolaserve info` reports."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import make_engine

from nolaserve.server.config import Config
from nolaserve.server.convert import server_info
from nolaserve.server.engine import memory
from nolaserve.server.engine.model_runner import warm_up_batches

CPU = torch.device("cpu")


def sizing(**kw):
    args = dict(kv_cache_bytes=0, device=CPU, gpu_memory_utilization=0.9, cpu_fraction=0.1,
                block_size=16, bytes_per_block=1000, max_seqs=4, max_model_len=1024,
                profile=lambda: pytest.fail("no profiling forward on CPU"))
    return memory.size_kv_cache(**{**args, **kw})


def test_explicit_bytes_override(monkeypatch):
    """The budget holds the scratch block too: the cache never passes it (an outside
    reader saw 257.3 MiB allocated for kv_cache_bytes 256 MiB)."""
    monkeypatch.setattr(memory, "available_ram_bytes", lambda: 1 << 40)
    s = sizing(kv_cache_bytes=12_345)
    assert (s.num_blocks, s.source, s.max_tokens) == (11, "kv_cache_bytes", 11 * 16)
    assert (s.num_blocks + 1) * 1000 <= 12_345


def test_cpu_takes_a_fraction_of_available_ram_capped_at_what_can_be_used(monkeypatch):
    monkeypatch.setattr(memory, "available_ram_bytes", lambda: 1_000_000)
    assert sizing().num_blocks == 99  # 0.1 x 1 MB / 1000 B, less the scratch block
    monkeypatch.setattr(memory, "available_ram_bytes", lambda: 1 << 40)
    assert sizing().num_blocks == 4 * 64  # 4 sequences x 1024 tokens / 16
    with pytest.raises(ValueError, match="holds no block"):
        sizing(kv_cache_bytes=999)


def test_available_ram_is_read():
    assert memory.available_ram_bytes() > 1 << 20


def test_config_bounds():
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        Config(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="cpu_kv_cache_fraction"):
        Config(cpu_kv_cache_fraction=0)
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        Config(kv_cache_bytes=-1)


def test_warm_up_covers_every_shape_bucket():
    batches = warm_up_batches(max_num_seqs=12, max_num_batched_tokens=100, max_model_len=40,
                              num_blocks=9, block_size=4, num_slots=3)
    prefill = batches[0]
    assert [len(t) for t in prefill.token_ids] == [39, 39, 22]
    assert all(prefill.all_logits)  # the profile's peak holds a prompt-logprobs step's logits
    assert [b.num_seqs for b in batches[1:]] == [1, 2, 4, 8, 12]
    assert all(max(t) < 9 for b in batches for t in b.block_table)
    assert batches[-1].adapter_slot == [i % 3 for i in range(12)]
    assert warm_up_batches(2, 8, 40, 9, 4, 0)[1].adapter_slot == [-1]


def test_engine_sizes_its_cache_warms_up_and_reports_it(monkeypatch, llama):
    steps = []
    from nolaserve.server.engine.model_runner import ModelRunner

    real = ModelRunner.warm_up
    monkeypatch.setattr(ModelRunner, "warm_up",
                        lambda self, *a: steps.append(real(self, *a)) or steps[-1])
    engine = make_engine(llama, None, kv_cache_bytes=0, max_num_seqs=4)
    # the tiny Llama (256 positions, block 4) x 4 sequences caps the budget
    assert engine.runner.num_kv_blocks == 4 * 64 == engine.scheduler.block_manager.num_blocks
    assert steps == [1 + 3]  # the prefill and decode batches of 1, 2, 4
    info = server_info(engine, Config(block_size=4))
    assert (info.kv_cache_blocks, info.block_size, info.max_context_tokens) == (256, 4, 256)
    engine.close()

