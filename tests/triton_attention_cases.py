"""The Triton paged-attention kernel (``server/engine/paged_triton.py``) against the torch
loop it documents and against the engine's torch attention path; run by
``test_triton_kernels.py`` in a child process under ``TRITON_INTERPRET=1`` (or on CUDA).

Not collected on its own, like ``triton_cases.py``.
"""

from __future__ import annotations

import copy
import os
import random

import pytest
import torch
from conftest import spec_of, tiny_llama
from test_model_runner import Blocks, hf_last_logits, prompts

from nolaserve.server.engine.attention import _torch_attention, torch_units
from nolaserve.server.engine.kv_cache import KVCache
from nolaserve.server.engine.model_runner import ModelRunner
from nolaserve.server.engine.paged_triton import paged_attention, paged_reference
from nolaserve.server.engine.step_buffers import StepBuffers
from nolaserve.server.engine.step_inputs import StepBatch, plan_packed

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRETED else "cuda"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def cache_case(ctx_lens: list[int], block_size: int, hkv: int, group: int, dtype,
               head_dim: int = 32, seed: int = 0):
    """A NaN-filled cache whose used positions hold random K/V, shuffled block tables and
    one decode query per sequence."""
    g = torch.Generator().manual_seed(seed)
    nbs = [-(-n // block_size) for n in ctx_lens]
    num_blocks = sum(nbs) + 3
    free = list(range(num_blocks))
    random.Random(seed).shuffle(free)
    tables = [[free.pop() for _ in range(k)] for k in nbs]
    max_nb = max(nbs)
    shape = (num_blocks, block_size, hkv, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    for bt, n in zip(tables, ctx_lens):
        for p in range(n):
            k_cache[bt[p // block_size], p % block_size] = torch.randn(hkv, head_dim, generator=g)
            v_cache[bt[p // block_size], p % block_size] = torch.randn(hkv, head_dim, generator=g)
    bt = torch.tensor([t + [num_blocks - 1] * (max_nb - len(t)) for t in tables])
    q = torch.randn(len(ctx_lens), hkv * group, head_dim, generator=g).to(dtype)
    seq = torch.arange(len(ctx_lens))
    pos = torch.tensor(ctx_lens) - 1
    return [t.to(DEVICE) for t in (q, k_cache, v_cache, bt, seq, pos)]


@pytest.mark.parametrize("block_size", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_decode_matches_the_torch_loop(block_size, group):
    args = cache_case([1, 5, block_size, block_size + 1, 3 * block_size - 2], block_size, 2,
                      group, torch.float32, seed=block_size + group)
    out = paged_attention(*args, scale=0.125)
    assert not out.isnan().any()  # NaN in unused blocks and past the context: never read
    torch.testing.assert_close(out, paged_reference(*args, scale=0.125), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_and_a_2k_context(dtype):
    args = cache_case([2048, 7], 64, 1, 8, dtype, head_dim=64, seed=3)
    out = paged_attention(*args, scale=64 ** -0.5)
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out, paged_reference(*args, scale=64 ** -0.5), **TOL[dtype])


def test_launcher_rejects_bad_inputs():
    q, k, v, bt, seq, pos = cache_case([4], 16, 2, 2, torch.float32)
    with pytest.raises(ValueError, match="share fp16"):
        paged_attention(q.double(), k, v, bt, seq, pos, 1.0)
    with pytest.raises(ValueError, match="heads"):
        paged_attention(q[:, :3], k, v, bt, seq, pos, 1.0)
    with pytest.raises(ValueError, match="token_seq and positions"):
        paged_attention(q, k, v, bt, seq[:0], pos, 1.0)


@pytest.mark.parametrize("block_size", [16, 32])
def test_mixed_decode_and_chunked_prefill_match_the_torch_path(block_size):
    """One step of three decodes (1, 40, 300 tokens of context) and two prefill chunks
    (fresh, and 9 new tokens over 50 cached) through the engine's step buffers: the kernel and
    the torch path give the same attention for every row."""
    hkv, group, d = 2, 3, 32
    q_lens, starts = [1, 1, 1, 12, 9], [0, 39, 299, 0, 50]
    ctx = [s + q for s, q in zip(starts, q_lens)]
    blocks = Blocks(num_blocks=64, seed=block_size)
    tables = [[blocks.free.pop() for _ in range(-(-c // block_size))] for c in ctx]
    cache = KVCache(1, 64, block_size, hkv, d)
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    g = torch.Generator().manual_seed(1)
    for bt, c in zip(tables, ctx):  # the cached context, then the step's own tokens
        for p in range(c):
            cache.k[0, bt[p // block_size], p % block_size] = torch.randn(hkv, d, generator=g)
            cache.v[0, bt[p // block_size], p % block_size] = torch.randn(hkv, d, generator=g)
    step = StepBuffers(8, 64, cache, None)
    batch = StepBatch.from_seqs([([0] * q, s, t, -1, True)
                                 for q, s, t in zip(q_lens, starts, tables)])
    with step.placing():
        step.fill_packed(plan_packed(batch, step.tables, block_size, 64, False), frozenset())
    step.attn_units = torch_units(step)
    T = len(step.positions)
    query = torch.randn(1, hkv * group, T, d, generator=g)
    key = cache.k[0].view(-1, hkv, d)[step.kv_slot].transpose(0, 1).unsqueeze(0)  # [1, Hkv, T, D]
    value = cache.v[0].view(-1, hkv, d)[step.kv_slot].transpose(0, 1).unsqueeze(0)
    expected = _torch_attention(step, 0, query, key, value, 0.2)  # [T, H, D]
    k_dev, v_dev = cache.k[0].to(DEVICE), cache.v[0].to(DEVICE)
    tables = step.kernel_tables()  # the columns the longest context (300) spans, not 64
    assert tables.shape[1] == {16: 32, 32: 16}[block_size]
    out = paged_attention(query[0].transpose(0, 1).to(DEVICE), k_dev, v_dev,
                          tables.to(DEVICE), step.token_rows.to(DEVICE),
                          step.positions.to(DEVICE), 0.2)
    assert not out.isnan().any()
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)


def test_runner_with_the_kernel_matches_transformers():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    runner = ModelRunner(model.to(DEVICE), spec_of(model), None, num_kv_blocks=128,
                         block_size=16, device=DEVICE, attention="triton")
    assert runner.kernel is paged_attention
    blocks = Blocks(num_blocks=128, seed=2)
    ps = prompts([3, 20], seed=5)
    tables = [[blocks.free.pop() for _ in range(-(-(len(p) + 2) // 16))] for p in ps]
    first = runner.execute(StepBatch.from_seqs([(p, 0, t, -1, True) for p, t in zip(ps, tables)]))
    nxt = first.argmax(-1).tolist()
    step = StepBatch.from_seqs([([x], len(p), t, -1, True) for p, t, x in zip(ps, tables, nxt)])
    for row, p, x in zip(runner.execute(step).cpu(), ps, nxt):
        torch.testing.assert_close(row, hf_last_logits(ref, p + [x]), atol=1e-4, rtol=0)
