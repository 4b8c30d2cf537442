"""Kernel benchmarks of ``benchmarks.gpu`` (one CUDA device): SGMV per call inside a CUDA
graph and paged decode attention against SDPA, each with the bytes it must move and the
GB/s that gives. The byte counts are plain arithmetic, tested on CPU
(tests/test_gpu_bench.py); the timings need CUDA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nolaserve.adapters.ops import LoraBatch

GRAPH_CALLS = 50  # calls captured in one graph: the replay's time / calls is one call's


def sgmv_bytes(tokens: int, d_in: int, d_out: int, rank: int, distinct: int,
               elem: int = 2) -> int:
    """Bytes one ``add_lora`` call must move at least: ``x`` read, ``y`` read and written,
    and each distinct slot's ``A [r, in]`` and ``B [out, r]`` read once."""
    return elem * (tokens * d_in + 2 * tokens * d_out + distinct * rank * (d_in + d_out))


def multi_bytes(tokens: int, d_in: int, outs: tuple[int, ...], rank: int, distinct: int,
                elem: int = 2) -> int:
    """Bytes one ``add_lora_multi`` call over modules sharing ``x`` must move at least:
    ``sgmv_bytes`` of each module, ``x`` read once."""
    return sum(sgmv_bytes(tokens, d_in, o, rank, distinct, elem) for o in outs) - \
        (len(outs) - 1) * elem * tokens * d_in


def attention_bytes(seqs: int, context: int, kv_heads: int, head_dim: int, heads: int,
                    elem: int = 2) -> int:
    """Bytes one decode step's attention must move at least: every sequence's K and V over
    its context, its query read and its output written."""
    return elem * seqs * (2 * context * kv_heads * head_dim + 2 * heads * head_dim)


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / ms / 1e6


def graph_ms(fn: Callable[[], object], calls: int = GRAPH_CALLS, repeat: int = 10) -> float:
    """Median milliseconds of one ``fn()`` inside a CUDA graph of ``calls`` calls, timed
    over whole replays with CUDA events (launch costs are out of the figure)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()  # compile and warm outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def sgmv_backends() -> dict[str, Callable]:
    """name -> ``fn(y, x, A, B, scale, batch)``: the split-K SGMV (the CUDA backend), its
    token -> slot form (graph buckets), the previous one-program-per-segment SGMV and the
    per-row BGMV of the graphed decode step."""
    from nolaserve.adapters.ops.triton_lora import sgmv
    from nolaserve.adapters.ops.triton_rows import bgmv
    from nolaserve.adapters.ops.triton_sgmv import sgmv_rows, sgmv_split_launch

    return {"split": sgmv_split_launch,
            "split-rows": lambda y, x, A, B, s, b: sgmv_rows(y, x, A, B, s, b.token_slot),
            "segment": sgmv,
            "bgmv": lambda y, x, A, B, s, b: bgmv(y, x, A, B, s, b.token_slot)}


def bench_sgmv(slots_for: Callable, spreads: tuple[str, ...], tokens: tuple[int, ...],
               d: int = 4096, r: int = 16, num_slots: int = 64) -> None:
    """Per-call in-graph time (us) and GB/s of each backend, bf16, ``d -> d``."""
    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    A = (torch.randn(num_slots, r, d, generator=gen) / d**0.5).to(dev, dt)
    B = torch.randn(num_slots, d, r, generator=gen).to(dev, dt)
    scale = torch.ones(num_slots, device=dev)
    backends = sgmv_backends()
    print(f"\nadd_lora in a CUDA graph, bf16, {d} -> {d}, r = {r}, {num_slots} slots: "
          f"us per call (GB/s)")
    print(f"{'spread':10s} {'tokens':>6s} " + " ".join(f"{n:>16s}" for n in backends))
    for spread in spreads:
        for n in tokens:
            x = torch.randn(n, d, generator=gen).to(dev, dt)
            y = torch.zeros(n, d, device=dev, dtype=dt)
            slots = slots_for(spread, n, num_slots, gen)
            batch = LoraBatch.from_token_slot(slots.to(dev))
            nbytes = sgmv_bytes(n, d, d, r, len(set(slots.tolist())))
            cells = []
            for fn in backends.values():
                ms = graph_ms(lambda fn=fn: fn(y, x, A, B, scale, batch))
                cells.append(f"{ms * 1e3:8.1f} ({gbps(nbytes, ms):5.0f})")
            print(f"{spread:10s} {n:6d} " + " ".join(cells))


def bench_attention(contexts: tuple[int, ...], seqs: int = 16, heads: int = 32,
                    kv_heads: int = 8, head_dim: int = 128, block_size: int = 16) -> None:
    """One decode step's attention (8B shape, bf16): the paged kernel against SDPA on
    contiguous K/V, in-graph ms and GB/s."""
    import torch.nn.functional as F

    from nolaserve.server.engine.paged_triton import paged_attention

    dev, dt = "cuda", torch.bfloat16
    print(f"\npaged decode attention, bf16, {seqs} seqs, {heads}/{kv_heads} heads of "
          f"{head_dim}: ms (GB/s)")
    for ctx in contexts:
        nb = -(-ctx // block_size)
        k = torch.randn(seqs * nb, block_size, kv_heads, head_dim, device=dev, dtype=dt)
        v = torch.randn_like(k)
        tables = torch.randperm(seqs * nb, device=dev).view(seqs, nb)
        q = torch.randn(seqs, heads, head_dim, device=dev, dtype=dt)
        seq = torch.arange(seqs, device=dev)
        pos = torch.full((seqs,), ctx - 1, device=dev)
        kc = torch.randn(seqs, kv_heads, ctx, head_dim, device=dev, dtype=dt)
        vc = torch.randn_like(kc)
        q4 = q.unsqueeze(2)  # [B, H, 1, D]
        nbytes = attention_bytes(seqs, ctx, kv_heads, head_dim, heads)
        paged = graph_ms(lambda: paged_attention(q, k, v, tables, seq, pos, head_dim**-0.5))
        sdpa = graph_ms(lambda: F.scaled_dot_product_attention(q4, kc, vc, enable_gqa=True))
        print(f"context {ctx:6d}: paged {paged:7.3f} ({gbps(nbytes, paged):6.0f})  "
              f"SDPA {sdpa:7.3f} ({gbps(nbytes, sdpa):6.0f})")


def bench_sgmv_multi(slots_for: Callable, tokens: tuple[int, ...], r: int = 16,
                     num_slots: int = 64) -> None:
    """A q/k/v group of an 8B shape (4096 -> 4096, 1024, 1024), distinct adapters: the
    split-K multi kernel against the previous one, us per call in a CUDA graph (GB/s)."""
    from nolaserve.adapters.ops.triton_multi import sgmv_multi_launch
    from nolaserve.adapters.ops.triton_sgmv_multi import sgmv_multi_split_launch

    dev, dt, d = "cuda", torch.bfloat16, 4096
    outs = (4096, 1024, 1024)
    gen = torch.Generator().manual_seed(1)
    As = [(torch.randn(num_slots, r, d, generator=gen) / d**0.5).to(dev, dt) for _ in outs]
    Bs = [torch.randn(num_slots, o, r, generator=gen).to(dev, dt) for o in outs]
    scales = [torch.ones(num_slots, device=dev) for _ in outs]
    print(f"\nadd_lora_multi q/k/v in a CUDA graph, bf16, {d} -> {outs}, r = {r}, distinct: "
          f"us per call (GB/s)")
    for n in tokens:
        x = torch.randn(n, d, generator=gen).to(dev, dt)
        ys = [torch.zeros(n, o, device=dev, dtype=dt) for o in outs]
        slots = slots_for("distinct", n, num_slots, gen)
        batch = LoraBatch.from_token_slot(slots.to(dev))
        distinct = len(set(slots.tolist()))
        nbytes = multi_bytes(n, d, outs, r, distinct)
        cells = []
        for name, fn in (("split", sgmv_multi_split_launch), ("segment", sgmv_multi_launch)):
            ms = graph_ms(lambda fn=fn: fn(ys, x, As, Bs, scales, batch))
            cells.append(f"{name} {ms * 1e3:8.1f} ({gbps(nbytes, ms):5.0f})")
        print(f"tokens {n:5d}: " + "  ".join(cells))


def bench_decode_lora(tokens: int = 64, r: int = 16, num_slots: int = 64) -> None:
    """The graphed decode step's q/k/v LoRA (8B shape, bf16, ``tokens`` rows on distinct
    slots): ``add_lora_multi_rows`` over the step's ``slot_runs`` (one launch pair) against
    the per-row BGMV per module (three launches), us per call in a CUDA graph (GB/s); and
    ``slot_runs`` itself, computed once per step for every layer."""
    from nolaserve.adapters.ops import add_lora_multi_rows, slot_runs
    from nolaserve.adapters.ops.triton_rows import bgmv

    dev, dt, d, outs = "cuda", torch.bfloat16, 4096, (4096, 1024, 1024)
    gen = torch.Generator().manual_seed(2)
    As = [(torch.randn(num_slots, r, d, generator=gen) / d**0.5).to(dev, dt) for _ in outs]
    Bs = [torch.randn(num_slots, o, r, generator=gen).to(dev, dt) for o in outs]
    scales = [torch.ones(num_slots, device=dev) for _ in outs]
    x = torch.randn(tokens, d, generator=gen).to(dev, dt)
    ys = [torch.zeros(tokens, o, device=dev, dtype=dt) for o in outs]
    token_slot = (torch.arange(tokens) % num_slots).to(dev)
    runs = slot_runs(token_slot)
    nbytes = multi_bytes(tokens, d, outs, r, min(tokens, num_slots))

    def rows_bgmv() -> None:
        for y, A, B, s in zip(ys, As, Bs, scales):
            bgmv(y, x, A, B, s, token_slot)

    fused = graph_ms(lambda: add_lora_multi_rows(ys, x, As, Bs, scales, token_slot, runs))
    old = graph_ms(rows_bgmv)
    sort = graph_ms(lambda: slot_runs(token_slot))
    print(f"\ngraphed decode q/k/v LoRA, bf16, {d} -> {outs}, r = {r}, {tokens} rows on "
          f"distinct slots: us per call (GB/s)")
    print(f"add_lora_multi_rows {fused * 1e3:8.1f} ({gbps(nbytes, fused):5.0f})  "
          f"bgmv x 3 {old * 1e3:8.1f} ({gbps(nbytes, old):5.0f})  "
          f"slot_runs once per step {sort * 1e3:6.1f}")
