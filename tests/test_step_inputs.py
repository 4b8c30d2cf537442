"""One step's inputs: packed once, copied in one tensor, shared by every layer; linears that
share an input (q/k/v, gate/up) get their deltas from one ``add_lora_multi`` call, held
to the reference op."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import spec_of, tiny_llama
from test_model_runner import Blocks, hf_last_logits, prompts, random_factors, runner_for

from nolaserve.adapters.ops import LoraBatch, SegmentPlan, add_lora, reference, step_backend
from nolaserve.adapters.slots import SlotPool
from nolaserve.server.engine import lora_layers
from nolaserve.server.engine.attention import torch_units
from nolaserve.server.engine.attention_plan import length_groups
from nolaserve.server.engine.kv_cache import KVCache
from nolaserve.server.engine.lora_layers import LoraLinear, SharedInput
from nolaserve.server.engine.step_buffers import StepBuffers, pinned
from nolaserve.server.engine.step_inputs import StepBatch, packed_order, plan_packed


def test_segment_plan_matches_the_tensor_route():
    slots = [2, -1, 0, 2, -1, 0, 5]
    plan = SegmentPlan.of(slots)
    assert plan.sorted_tokens == [2, 5, 0, 3, 6] and plan.seg_starts == [0, 2, 4, 5]
    b = LoraBatch.from_token_slot(torch.tensor(slots))
    assert b.seg_start_index.tolist() == [0, 2, 4, 5] and b.seg_slots == (0, 2, 5)
    assert SegmentPlan.of([3, 4, 5]).consecutive_from == 3
    assert SegmentPlan.of([3, 3, 4]).identity_order and SegmentPlan.of([]).max_slot == -1
    with pytest.raises(ValueError, match=">= -1"):
        SegmentPlan.of([0, -2])


def test_a_packed_step_is_one_copy_and_orders_decodes_first():
    cache = KVCache(1, 64, 4, 1, 8)
    step = StepBuffers(4, 16, cache, None)
    batch = StepBatch.from_seqs([([1, 2, 3], 0, [0], 1, True), ([4], 5, [1, 2], 0, True),
                                 ([5], 60, list(range(3, 19)), -1, False)])
    with step.placing():
        step.fill_packed(plan_packed(batch, step.tables, 4, 64, True), frozenset({"q"}))
    assert packed_order(batch, 4) == [1, 2, 0]
    assert step.input_ids.tolist() == [4, 5, 1, 2, 3]
    assert step.positions.tolist() == [5, 60, 0, 1, 2]
    assert step.logits_rows.tolist() == [4, 0]  # batch order: seq 0 (last row 4), seq 1
    assert step.lora.token_slot.tolist() == [0, -1, 1, 1, 1]
    assert step.kv_slot.tolist() == [2 * 4 + 1, 18 * 4 + 0, 0, 1, 2]
    tables = step.block_tables[step.seq_rows]
    assert tables[0, :2].tolist() == [1, 2] and tables[1].tolist() == list(range(3, 19))
    assert tables[2, 0] == 0
    tensors = [step.input_ids, step.positions, step.logits_rows, step.kv_slot, step.seq_rows,
               step.lora.sorted_tokens, step.lora.seg_start_index]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
    # lengths 6 and 61 tokens (2 and 16 blocks): two decode groups, no padding to 16 for both
    assert [(u.rows, u.tables.shape[1]) for u in torch_units(step) if u.decode] == [(1, 2),
                                                                                    (1, 16)]


def test_length_groups_bound_the_padding():
    nb = [1, 3, 8, 9, 17, 200, 16, 40]
    gid = length_groups(nb)
    assert gid[0] == gid[1] == gid[2] == gid[3 - 1]  # up to GROUP_MIN_BLOCKS together
    for g in set(gid):
        members = [n for n, i in zip(nb, gid) if i == g]
        assert max(members) <= max(2 * min(members), 8)


def test_ragged_decode_lengths_match_transformers():
    """Decode sequences of 2 and 150 tokens (1 and 38 blocks): separate gathers, exact."""
    model = tiny_llama()
    ref = copy.deepcopy(model)
    runner, blocks = runner_for(model), Blocks(seed=3)
    ps = prompts([2, 150, 40], seed=9)
    tables = [blocks.table(len(p) + 1) for p in ps]
    first = runner.execute(StepBatch.from_seqs([(p, 0, t, -1, True) for p, t in zip(ps, tables)]))
    nxt = first.argmax(-1).tolist()
    step = StepBatch.from_seqs([([x], len(p), t, -1, True) for p, t, x in zip(ps, tables, nxt)])
    for row, p, x in zip(runner.execute(step), ps, nxt):
        torch.testing.assert_close(row, hf_last_logits(ref, p + [x]), atol=1e-4, rtol=0)


def adapter_runner():
    model = tiny_llama()
    spec = spec_of(model, max_rank=4)
    pool = SlotPool(spec, 4, lambda i: random_factors(i, spec))
    slots = [pool.acquire(i) for i in ("a", "b", "c")]
    return model, runner_for(model, pool, spec), slots


def test_shared_input_groups_form_per_layer():
    model, runner, _ = adapter_runner()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.group is attn.k_proj.group is attn.v_proj.group is not None
    assert mlp.gate_proj.group is mlp.up_proj.group is not None
    assert attn.o_proj.group is None and mlp.down_proj.group is None
    assert attn.q_proj.group is not model.model.layers[1].self_attn.q_proj.group


def test_groups_call_the_multi_op_once_and_match_the_reference_op(monkeypatch):
    """Every grouped linear's output equals base(x) + the reference ``add_lora`` of its own
    factors, and a step makes one multi call per group per layer (2 groups x 2 layers)."""
    model, runner, slots = adapter_runner()
    seen: list[tuple[LoraLinear, torch.Tensor, torch.Tensor]] = []

    def record(self, x):
        y = LoraLinear.forward(self, x)
        seen.append((self, x.detach().clone(), y.detach().clone()))
        return y

    for m in runner.lora_layers:
        monkeypatch.setattr(m, "forward", record.__get__(m))
    calls = []
    real = SharedInput.output

    def counting(self, member, x):
        if runner.step.shared.get(self, (None, {}))[0] is not x:
            calls.append(self)
        return real(self, member, x)

    monkeypatch.setattr(SharedInput, "output", counting)
    ps = prompts([3, 1, 4], seed=1)
    blocks = Blocks()
    batch = StepBatch.from_seqs([(p, 0, blocks.table(len(p)), s, True)
                                 for p, s in zip(ps, [slots[0], -1, slots[2]])])
    runner.execute(batch)
    assert len(calls) == 4
    # packed order: the decode token (base), then the prefills by slot
    packed = LoraBatch.from_token_slot(torch.tensor([-1, *[slots[0]] * 3, *[slots[2]] * 4]))
    for lin, x, y in seen:
        with torch.no_grad():
            x2 = x.reshape(-1, lin.in_features)
            expected = lin.base(x).reshape(-1, lin.out_features)
        add_lora(expected, x2, lin.A, lin.B, lin.scale, packed, backend=reference)
        torch.testing.assert_close(y.reshape(-1, lin.out_features), expected, atol=1e-5,
                                   rtol=1e-5)
    assert len(seen) == 2 * 7


def test_each_linear_and_group_binds_its_buffers_once_for_every_step(monkeypatch):
    """The LoRA op's arguments are bound once per wrapper (its ``Factors``: what the kernels'
    launch arguments are prepared from), not rebuilt per layer per step: two steps call it
    with the very same ``Factors`` objects, holding the wrappers' own slot buffers."""
    model, runner, slots = adapter_runner()
    used = []
    real = lora_layers.add_deltas
    monkeypatch.setattr(lora_layers, "add_deltas",
                        lambda step, ys, x, factors: (used.append(factors),
                                                      real(step, ys, x, factors)))
    blocks = Blocks()
    for seed in (1, 2):
        ps = prompts([3, 2], seed=seed)
        runner.execute(StepBatch.from_seqs([(p, 0, blocks.table(len(p)), s, True)
                                            for p, s in zip(ps, slots[:2])]))
    first, second = used[: len(used) // 2], used[len(used) // 2 :]
    assert len(first) == 2 * 4  # per layer: q/k/v, o, gate/up, down
    assert all(a is b for a, b in zip(first, second, strict=True))
    buffers = {id(t) for m in runner.lora_layers for t in (m.A, m.B, m.scale)}
    assert all(id(t) in buffers for f in first for t in (*f.As, *f.Bs, *f.scales))
    assert sorted(len(f.As) for f in first) == [1, 1, 1, 1, 2, 2, 3, 3]


def test_a_member_called_on_another_input_computes_its_own():
    model, runner, slots = adapter_runner()
    q = model.model.layers[0].self_attn.q_proj
    k = model.model.layers[0].self_attn.k_proj
    batch = LoraBatch.from_token_slot(torch.tensor([slots[0], slots[1]]))
    step = runner.step
    step.lora, step.lora_modules = batch, frozenset(m.name for m in runner.lora_layers)
    step.lora_backend = step_backend(batch, torch.device("cpu"))
    try:
        x1, x2 = torch.randn(2, 64), torch.randn(2, 64)
        with torch.no_grad():
            q(x1)
            got = k(x2)  # not x1: the cached k(x1) must not be returned
            expected = k.base(x2)
    finally:
        step.clear()
    add_lora(expected, x2, k.A, k.B, k.scale, batch, backend=reference)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_copies_queued_back_to_back_each_land_whole():
    """Host buffers freed right after their copy was queued, and taken again, with no sync
    between (a slow kernel first keeps the copies pending): every copy lands whole."""
    torch.cuda._sleep(100_000_000)  # the stream stays busy while the host goes on
    sent = []
    for i in range(64):
        values = [i] * (7 + 1000 * (i % 5))
        host = pinned(len(values))
        host.numpy()[:] = values
        dev = torch.empty(len(values), dtype=torch.long, device="cuda")
        dev.copy_(host, non_blocking=True)
        sent.append((dev, values))
        del host
    for dev, values in sent:
        assert dev.tolist() == values
