"""The measurements of ``benchmarks.overhead`` that need no engine run: per-linear costs,
the compute floor, transformers' eager step, the context-length sweep and the roofline."""

from __future__ import annotations

import collections
import random
import statistics
import time

import torch
import torch.nn.functional as F

from nolaserve.server.engine import attention_plan, step_inputs
from nolaserve.server.engine.engine import Engine
from nolaserve.server.engine.model_runner import ModelRunner
from nolaserve.server.engine.step_inputs import StepBatch


def median_us(fn, repeat: int = 200, warm: int = 10) -> float:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times)


def print_linear_costs(engine: Engine) -> None:
    """One packed step of one token on each of 64 distinct slots in the runner's
    ``StepBuffers``, then one adapted linear called alone: the wrapper, its LoRA backend
    alone and the base linear."""
    runner = engine.runner
    lin = runner.lora_layers[0]  # layer 0 q_proj (grouped with v_proj)
    batch = StepBatch.from_seqs([([1], 3, [i], i, True) for i in range(64)])
    runner._fill_packed(batch, all_modules=True)
    x = torch.randn(1, 64, lin.in_features)
    y = torch.empty(64, lin.out_features)
    x2 = x.view(64, -1)
    step = runner.step
    backend = getattr(getattr(step.lora_backend, "keywords", {}).get("backend"), "__name__", "?")
    try:
        with torch.inference_mode():
            base = median_us(lambda: lin.base(x))
            op = median_us(lambda: step.lora_backend((y,), x2, lin.factors, step.lora))
            group = median_us(lambda: (step.shared.clear(), lin(x)))
            members = len(lin.group.members) if lin.group else 1
    finally:
        step.clear()
    print(f"\nper adapted linear, 64 tokens on 64 slots ({lin.in_features} -> "
          f"{lin.out_features}, r={lin.A.shape[1]}, StepBuffers filled):")
    print(f"  base linear alone            {base:8.1f} us")
    print(f"  LoRA backend call alone      {op:8.1f} us ({backend})")
    print(f"  grouped wrapper call         {group:8.1f} us for {members} linears "
          f"(base + one add_lora_multi); host us per adapted linear beyond base + op: "
          f"{(group - members * (base + op)) / members:.1f}")


def print_sgmv_host_costs(tokens: int = 64, slots: int = 64, r: int = 16) -> None:
    """Our own host work per split-K SGMV call on a q/k/v group of an 8B shape, with the two
    Triton kernels stubbed (what neither the GPU nor Triton's launcher spends): the buffers
    as lists, launches prepared on every call, against a ``Factors`` bound once (the
    engine's form since #27 item 2). A graph replays neither; an eager step pays it per
    group per layer."""
    from nolaserve.adapters.ops import Factors, SlotRuns
    from nolaserve.adapters.ops import triton_sgmv as ts
    from nolaserve.adapters.ops.triton_sgmv_multi import sgmv_multi_rows

    d, outs = 4096, (4096, 1024, 1024)
    As = [torch.zeros(slots, r, d) for _ in outs]
    Bs = [torch.zeros(slots, o, r) for o in outs]
    scales = [torch.zeros(slots) for _ in outs]
    x, ys = torch.zeros(tokens, d), tuple(torch.zeros(tokens, o) for o in outs)
    token_slot = torch.arange(tokens) % slots
    runs, factors = SlotRuns.of(token_slot), Factors.of(As, Bs, scales)
    kernels = ts._shrink_kernel, ts._expand_kernel
    ts._shrink_kernel = ts._expand_kernel = collections.defaultdict(lambda: lambda *a, **k: None)
    try:
        lists = median_us(lambda: sgmv_multi_rows(ys, x, As, Bs, scales, token_slot, runs),
                          repeat=2000)
        bound = median_us(lambda: ts.sgmv_factors_rows(ys, x, factors, token_slot, runs),
                          repeat=2000)
    finally:
        ts._shrink_kernel, ts._expand_kernel = kernels
    print(f"\nsplit-K SGMV host work per q/k/v call ({tokens} tokens, kernels stubbed): "
          f"lists {lists:.1f} us, bound Factors {bound:.1f} us ({lists / bound:.1f}x less)")


def compute_floor(model, num_seqs: int, ctx_len: int) -> float:
    """ms of one decode step's matmuls, attention and lm_head alone, back to back."""
    cfg = model.config
    layers = model.model.layers
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = torch.randn(num_seqs, cfg.hidden_size)
    k = torch.randn(num_seqs, Hkv, ctx_len, D)
    v = torch.randn(num_seqs, Hkv, ctx_len, D)
    head = model.lm_head.weight

    def step() -> None:
        h = x
        for layer in layers:
            a, m = layer.self_attn, layer.mlp
            q = F.linear(h, a.q_proj.weight).view(num_seqs, Hkv, H // Hkv, D)
            F.linear(h, a.k_proj.weight)
            F.linear(h, a.v_proj.weight)
            o = F.scaled_dot_product_attention(q, k, v).reshape(num_seqs, -1)
            h = F.linear(o, a.o_proj.weight)
            g = F.linear(h, m.gate_proj.weight) * F.linear(h, m.up_proj.weight)
            h = F.linear(g, m.down_proj.weight)
        F.linear(h, head).argmax(-1)

    with torch.inference_mode():
        return median_us(step, repeat=50) / 1e3


def hf_step_ms(model, num_seqs: int = 64, ctx_len: int = 48) -> float:
    """transformers' eager forward of one decode token per sequence over a DynamicCache
    of ``ctx_len`` tokens (the cache reset to that length between repeats)."""
    from transformers import DynamicCache

    ids = torch.randint(0, model.config.vocab_size, (num_seqs, ctx_len))
    with torch.inference_mode():
        times = []
        for _ in range(8):
            cache = DynamicCache()
            out = model(ids, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            model(nxt, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times[2:])


def context_sweep(model, num_seqs: int = 16, block_size: int = 16) -> None:
    """Decode step ms of ``num_seqs`` sequences at several context lengths, through the
    runner, with the torch attention path: one padded gather of the whole batch (before)
    against length groups (after). The cache holds random values (attention's cost does
    not depend on them)."""
    cases = {"256": [256] * num_seqs, "1k": [1024] * num_seqs, "4k": [4096] * num_seqs,
             "ragged 15x256 + 1x4k": [256] * (num_seqs - 1) + [4096]}
    blocks = sum(-(-n // block_size) for n in cases["4k"]) + 1
    runner = ModelRunner(model, None, None, blocks, block_size)
    runner.kv_cache.k.normal_()
    runner.kv_cache.v.normal_()
    print(f"\ndecode step, {num_seqs} sequences, torch attention path, block {block_size}:")
    print(f"  {'context':24s} {'before (ms)':>12s} {'after (ms)':>12s}")
    for name, lens in cases.items():
        free = list(range(blocks))
        random.Random(0).shuffle(free)
        tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lens]
        batch = StepBatch.from_seqs([([1], n - 1, t, -1, True) for n, t in zip(lens, tables)])
        after = median_us(lambda: runner.execute(batch), repeat=15, warm=2) / 1e3
        with _one_group():
            before = median_us(lambda: runner.execute(batch), repeat=15, warm=2) / 1e3
        print(f"  {name:24s} {before:12.2f} {after:12.2f}")


class _one_group:
    """Every decode sequence in one group: the padded whole-batch gather of before."""

    def __enter__(self):
        self.saved = attention_plan.length_groups, step_inputs.length_groups
        attention_plan.length_groups = step_inputs.length_groups = lambda nb: [0] * len(nb)

    def __exit__(self, *exc):
        attention_plan.length_groups, step_inputs.length_groups = self.saved


def roofline(n: int = 2048) -> None:
    """A large fp32 matmul's FLOP/s, then SmolLM2-135M base-only decode at batch 64 as a
    fraction of it (2 FLOP per weight per token computed, embeddings excluded, lm_head
    included): over the decode steps with all 64 sequences, and over the whole run
    (prefill tokens counted as computed tokens)."""
    from nolaserve.server.build import build_engine
    from nolaserve.server.config import Config
    from nolaserve.server.engine import model_loader as ml
    from nolaserve.server.engine.sequence import SamplingParams

    a, b = torch.randn(n, n), torch.randn(n, n)
    peak = 2 * n ** 3 / (median_us(lambda: a @ b, repeat=7, warm=2) / 1e6)
    model, tok = ml.load_model(device="cpu", dtype="float32")
    weights = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name)
    weights += model.lm_head.weight.numel()  # tied: counted once more as the lm_head matmul
    engine = build_engine(Config(registry_path=":memory:", num_slots=1, max_num_seqs=64,
                                 max_num_batched_tokens=1024, kv_cache_bytes=256 << 20),
                          model=model, tokenizer=tok)
    rng = random.Random(1)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    for i in range(64):
        engine.add_request(f"r{i}", [rng.randrange(100, 49152) for _ in range(rng.randint(16, 48))],
                           params)
    steps: list[tuple[int, int, float]] = []  # (sequences, tokens, seconds)
    engine.observe(lambda s: steps.append((s.num_seqs, s.num_tokens, time.perf_counter())))
    start = last = time.perf_counter()
    decode = []
    while engine.has_unfinished():
        engine.step()
        seqs, tokens, now = steps[-1]
        if seqs == tokens == 64:
            decode.append(now - last)
        last = now
    total = sum(t for _, t, _ in steps) * 2 * weights / (last - start)
    engine.close()
    step = statistics.median(decode)
    flops = 64 * 2 * weights / step
    print(f"\nroofline: fp32 matmul {n}^3: {peak / 1e9:.1f} GFLOP/s; SmolLM2-135M base only, "
          f"64 sequences: decode step {step * 1e3:.1f} ms = {flops / 1e9:.1f} GFLOP/s = "
          f"{flops / peak:.0%} of the matmul peak; whole run (prefill included) "
          f"{total / 1e9:.1f} GFLOP/s = {total / peak:.0%}")
