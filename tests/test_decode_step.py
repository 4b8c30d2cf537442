"""The decode path at fixed shapes (``DecodeStep`` over ``StepBuffers``): what a CUDA graph
replays, run eagerly on CPU. Its bookkeeping (buckets, padding rows, the scratch block) is
held to the packed eager path, and its forward to a replay of a traced graph."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import spec_of, tiny_llama
from engine_helpers import make_engine
from test_model_runner import Blocks, prompts, random_factors
from torch.fx.experimental.proxy_tensor import make_fx

from nolaserve.adapters.slots import SlotPool
from nolaserve.server.engine.decode_step import DecodeStep
from nolaserve.server.engine.model_runner import ModelRunner, StepBatch
from nolaserve.server.engine.step_buffers import bucket_of, decode_buckets, width_of

MAX_SEQS, MAX_LEN, BLOCK = 24, 64, 4
CUDA_BUCKETS = decode_buckets(MAX_SEQS)  # 1, 2, 4, 8, 16, 24: what CUDA captures


def test_buckets_and_widths():
    assert decode_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert decode_buckets(1) == [1] and decode_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert decode_buckets(256)[-3:] == [224, 240, 256]
    assert [bucket_of(n, CUDA_BUCKETS) for n in (1, 3, 8, 9, 16, 17, 24)] == \
        [1, 4, 8, 16, 16, 24, 24]
    with pytest.raises(ValueError, match="largest decode bucket"):
        bucket_of(25, CUDA_BUCKETS)
    assert [width_of(b, 16) for b in (1, 2, 3, 9, 16, 30)] == [1, 2, 4, 16, 16, 16]


def runner(model, eager: bool, buckets=None) -> tuple[ModelRunner, list[int]]:
    """A runner on 3 random adapters; eager: the packed path only; else the decode path
    padded to ``buckets``."""
    spec = spec_of(model, max_rank=4)
    pool = SlotPool(spec, 4, lambda i: random_factors(i, spec))
    slots = [pool.acquire(i) for i in ("ad-a", "ad-b", "ad-c")]
    r = ModelRunner(copy.deepcopy(model), spec, pool, num_kv_blocks=256, block_size=BLOCK,
                    enforce_eager=eager)
    r.warm_up(MAX_SEQS, 32, MAX_LEN)
    if not eager:
        r.decode = DecodeStep(r.model, r.step, MAX_SEQS, graphs=False, pool=pool,
                              buckets=buckets)
    return r, slots


def decode_steps(runners: list[ModelRunner], n: int, slots: list[int], steps: int,
                 check=None, atol: float = 1e-5) -> list[list[int]]:
    """Prefill ``n`` ragged prompts (mixed adapters, base rows among them), then ``steps``
    greedy decode steps on every runner; asserts their logits agree (within ``atol``) at
    every step."""
    ps = prompts([1 + (5 * i) % 23 for i in range(n)], seed=n)
    seq_slots = [slots[i % 3] if i % 4 else -1 for i in range(n)]
    blocks = Blocks(seed=n)
    tables = [blocks.table(len(p) + steps + 1) for p in ps]
    seqs = [list(p) for p in ps]
    batch = StepBatch.from_seqs([(p, 0, t, s, True) for p, t, s in zip(ps, tables, seq_slots)])
    for _ in range(steps + 1):
        logits = [r.execute(batch) for r in runners]
        for other in logits[1:]:
            torch.testing.assert_close(other, logits[0], atol=atol, rtol=0)
        nxt = logits[0].argmax(-1).tolist()
        batch = StepBatch()
        for seq, t, s, tok in zip(seqs, tables, seq_slots, nxt):
            batch.add([tok], len(seq), t, s)
            seq.append(tok)
        if check is not None:
            check(batch)
    return seqs


@pytest.mark.parametrize("n", (1, 8, 9, 16, 17, 24))  # bucket edges: size and size + 1
def test_padded_decode_equals_the_packed_eager_path(n):
    model = tiny_llama()
    eager, slots = runner(model, eager=True)
    padded, _ = runner(model, eager=False, buckets=CUDA_BUCKETS)
    exact, _ = runner(model, eager=False)
    assert exact.decode.buckets == list(range(1, MAX_SEQS + 1))  # CPU default: no padding
    decode_steps([eager, padded, exact], n, slots, steps=4)


def test_the_torch_path_gathers_exactly_the_longest_contexts_blocks():
    """Without the Triton kernel a decode step's width is the blocks its longest context
    spans, not rounded up (on CPU a padded column costs as much as a real one)."""
    r, slots = runner(tiny_llama(), eager=False)
    batch = StepBatch.from_seqs([([1], pos, list(range(10)), -1, True) for pos in (3, 35)])
    assert r.decode.shape_of(batch).width == 35 // BLOCK + 1 == 9


def test_padding_rows_never_touch_a_real_kv_block():
    model = tiny_llama()
    r, slots = runner(model, eager=False, buckets=CUDA_BUCKETS)
    cache = r.kv_cache
    real = cache.num_blocks

    def check(batch: StepBatch) -> None:
        before = cache.k[:, :real].clone(), cache.v[:, :real].clone()
        assert bucket_of(batch.num_seqs, CUDA_BUCKETS) > batch.num_seqs  # padding present
        r.execute(batch)
        written = torch.zeros(real * BLOCK, dtype=torch.bool)
        for pos, table in zip(batch.start_pos, batch.block_table):
            written[table[pos // BLOCK] * BLOCK + pos % BLOCK] = True
        for now, was in zip((cache.k[:, :real], cache.v[:, :real]), before):
            bits = now.view(torch.int32) != was.view(torch.int32)  # NaN-safe: bits
            changed = bits.flatten(3).any(-1).any(0).flatten()  # [blocks * bs]
            assert not (changed & ~written).any()
            assert changed[written].all()

    decode_steps([r], 5, slots, steps=2, check=check)


def test_the_forward_reads_nothing_but_the_buffers():
    """What a CUDA graph does, on CPU: trace one decode forward (``make_fx`` records every
    tensor op and bakes in whatever the Python code read), then fill the buffers with
    another step of the same shape (other tokens, positions, blocks and adapters) and
    replay the trace: it must give the eager forward's logits. A host read of per-step
    state (a list, a ``.tolist()``, a dict looked up by key) would be baked in and differ."""
    model = tiny_llama()
    r, slots = runner(model, eager=False, buckets=CUDA_BUCKETS)
    dec = r.decode
    steps = []

    def record(batch: StepBatch) -> None:
        steps.append(copy.deepcopy(batch))

    decode_steps([r], 7, slots, steps=2, check=record)
    first, later = steps[0], steps[-1]
    later.adapter_slot = later.adapter_slot[1:] + later.adapter_slot[:1]
    later.token_ids = [[(t[0] + 7) % 256] for t in later.token_ids]

    def fill(batch: StepBatch):
        shape = dec.shape_of(batch)
        dec.step.fill_decode([t[0] for t in batch.token_ids], batch.start_pos,
                             batch.block_table, batch.adapter_slot, shape)
        return shape

    shape = fill(first)
    traced = make_fx(lambda: dec.forward(shape))()
    assert fill(later) == shape
    replayed = traced()[:7].clone()
    fill(later)
    torch.testing.assert_close(replayed, dec.forward(shape)[:7], atol=0, rtol=0)


def test_ragged_contexts_take_the_packed_path_without_the_kernel():
    """The torch attention gathers every row to the longest context: a ragged decode batch
    (which ``length_groups`` would split) is left to the packed path."""
    r, _ = runner(tiny_llama(), eager=False)

    def batch(positions):
        return StepBatch.from_seqs([([1], p, list(range(p // BLOCK + 1)), -1, True)
                                    for p in positions])

    assert r.decode.takes(batch([3, 30, 31]))  # 1 to 8 blocks: within GROUP_MIN_BLOCKS
    assert r.decode.takes(batch([40, 60]))  # 11 and 16 blocks: within 2x
    assert not r.decode.takes(batch([3, 60]))  # 1 and 16 blocks
    assert not r.decode.takes(StepBatch.from_seqs([([1, 2], 0, [0], -1, True)]))  # prefill


def test_enforce_eager_turns_the_decode_path_off():
    model = tiny_llama()
    assert make_engine(model, None).runner.decode is not None
    assert make_engine(model, None, enforce_eager=True).runner.decode is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_graph_replay_equals_eager_on_cuda(dtype, atol):
    """Captured graphs (one per bucket) give the eager forward's logits, fp32 and bf16
    (the serving dtype: its own dot paths, which the interpreter never runs), mixed
    adapters, every bucket edge."""
    model = tiny_llama().to("cuda", dtype)
    spec = spec_of(model, max_rank=4)
    runners = []
    for graphs in (True, False):
        pool = SlotPool(spec, 4, lambda i: random_factors(i, spec), device="cuda", dtype=dtype)
        slots = [pool.acquire(i) for i in ("ad-a", "ad-b", "ad-c")]
        r = ModelRunner(copy.deepcopy(model), spec, pool, num_kv_blocks=256, block_size=BLOCK,
                        device="cuda", dtype=dtype)
        r.warm_up(MAX_SEQS, 32, MAX_LEN, capture=graphs)
        assert bool(r.decode.graphs) == graphs
        runners.append(r)
    for n in (1, 2, 3, 16, 17):
        decode_steps(runners, n, slots, steps=3, atol=atol)
