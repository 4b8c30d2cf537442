"""GPU benchmarks of the Triton kernels and the engine, on one CUDA device.

    python -m nolaserve.benchmarks.gpu [--only ops,attention,regen,engine] [--quick]

- ops: ``add_lora`` per call inside a CUDA graph (``gpu_kernels.bench_sgmv``): the split-K
  SGMV, its token -> slot form, the previous segment SGMV and the row BGMV, bf16,
  4096 -> 4096, r = 16, 64 slots, over adapter spreads and 1-4096 tokens, with GB/s; and
  a q/k/v group through the split-K and the previous ``add_lora_multi`` kernels; and the
  graphed decode step's ``add_lora_multi_rows`` over q/k/v (64 rows, 64 distinct slots)
  against the per-row BGMV it replaced.
- attention: paged decode attention against SDPA at contexts 512, 4k and 32k, GB/s.
- regen: NOLA regeneration (``NolaAdapter.materialize`` on CUDA = one Triton launch per
  adapter) for SmolLM2-135M (q/v, r = 8, k = l = 256) and a Llama-2-7B shape (32 layers,
  all seven linears, r = 16, k = l = 128): fp32 factors, and a slot load regenerated
  straight into bf16 slot buffers (``slot_direct.write_direct``: zeroing, one launch, the
  finite check's sync).
- engine: generated tokens/s, base only against 64 distinct and 1,000 registered NOLA
  adapters (64 slots), on SmolLM2-135M and on a random-initialized ~1B Llama.

``--quick``: a few sizes of each part (a smoke run). Without CUDA (or triton) it prints why
and exits 0.
"""

from __future__ import annotations

import argparse
import random

import torch

from nolaserve.adapters.nola import random_nola
from nolaserve.adapters.slot_direct import write_direct
from nolaserve.adapters.spec import BaseModelSpec
from nolaserve.benchmarks import gpu_kernels

SPREADS = ("identical", "distinct", "uniform", "zipf", "skewed")
TOKENS = (1, 4, 16, 64, 256, 1024, 4096)
CONTEXTS = (512, 4096, 32768)
PARTS = ("ops", "attention", "regen", "engine")
LLAMA7B = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096),
           "self_attn.v_proj": (4096, 4096), "self_attn.o_proj": (4096, 4096),
           "mlp.gate_proj": (4096, 11008), "mlp.up_proj": (4096, 11008),
           "mlp.down_proj": (11008, 4096)}
LLAMA_1B = dict(vocab_size=49152, hidden_size=2048, intermediate_size=5632,
                num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                max_position_embeddings=2048, tie_word_embeddings=False)


def slots_for(spread: str, n: int, num_slots: int, gen: torch.Generator) -> torch.Tensor:
    """[n] int64 token -> slot, the spreads of tests/test_add_lora.py."""
    if spread == "identical":
        return torch.zeros(n, dtype=torch.long)
    if spread == "distinct":
        return torch.arange(n) % num_slots
    if spread == "zipf":
        p = 1.0 / torch.arange(1, num_slots + 1, dtype=torch.float64) ** 1.5
        return torch.multinomial(p, n, replacement=True, generator=gen)
    slots = torch.randint(0, num_slots, (n,), generator=gen)
    if spread == "skewed":
        slots[torch.rand(n, generator=gen) < 0.9] = 1
    return slots


def cuda_ms(fn, repeat: int = 20) -> float:
    """Median milliseconds of ``fn()`` timed with CUDA events, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def regen_values(spec: BaseModelSpec, rank: int, k: int) -> int:
    """Basis values one adapter's regeneration draws: ``k * r * (in + out)`` per module
    (k = l) and layer."""
    return spec.num_layers * sum(k * rank * (i + o) for i, o in spec.module_shapes.values())


def bench_regen() -> None:
    from nolaserve.adapters import nola_triton, philox

    if philox._cuda_contract() is not nola_triton.contract:
        raise RuntimeError("philox.contract does not route CUDA tensors to the Triton kernel")
    smollm = BaseModelSpec(num_layers=30, module_shapes={"self_attn.q_proj": (576, 576),
                                                         "self_attn.v_proj": (576, 192)},
                           max_rank=16, name="SmolLM2-135M")
    llama = BaseModelSpec(num_layers=32, module_shapes=LLAMA7B, max_rank=16, name="Llama-2-7B")
    print("\nNOLA regeneration on CUDA (Triton kernel), median of 5")
    for spec, rank, k in ((smollm, 8, 256), (llama, 16, 128)):
        adapter = random_nola(spec, seed=(1 << 40) + 7, rank=rank, num_basis=k)
        values = regen_values(spec, rank, k)
        ms = cuda_ms(lambda a=adapter: a.materialize("cuda"), repeat=5)
        bufs = slot_buffers(spec)
        direct = cuda_ms(lambda a=adapter, b=bufs, s=spec: write_direct(b, 0, a.direct(), s),
                         repeat=5)
        print(f"{spec.name:14s} r={rank:2d} k=l={k:3d}: {ms:8.2f} ms "
              f"({values / ms / 1e6:.1f} G basis values/s); into a bf16 slot {direct:8.2f} ms")


def slot_buffers(spec: BaseModelSpec) -> dict:
    """A ``SlotPool``'s ``(A, B, scale)`` per module, bf16, two slots."""
    r = spec.max_rank
    return {(i, name): (torch.empty(2, r, d_in, device="cuda", dtype=torch.bfloat16),
                        torch.empty(2, d_out, r, device="cuda", dtype=torch.bfloat16),
                        torch.empty(2, device="cuda", dtype=torch.bfloat16))
            for i in range(spec.num_layers) for name, (d_in, d_out) in spec.module_shapes.items()}


def bench_engine_on(label: str, requests: int, max_tokens: int, model=None,
                    tokenizer=None) -> None:
    from nolaserve.benchmarks.engine import run_batch
    from nolaserve.server.build import build_engine
    from nolaserve.server.config import Config

    config = Config(registry_path=":memory:", device="cuda", num_slots=64, max_rank=8,
                    max_num_seqs=requests, max_num_batched_tokens=2048,
                    kv_cache_bytes=2 << 30)
    engine = build_engine(config, model=model, tokenizer=tokenizer)
    targets = ["self_attn.q_proj", "self_attn.v_proj"]
    for i in range(1000):
        engine.store.register(f"nola-{i}", random_nola(engine.store.spec, seed=i, rank=8,
                                                       num_basis=256, targets=targets,
                                                       coeff_std=0.1).to_bytes())
    rng = random.Random(0)
    vocab = engine.runner.vocab_size
    prompts = [[rng.randrange(100, vocab) for _ in range(rng.randint(16, 48))]
               for _ in range(requests)]
    scenarios = {"base only": [None] * requests,
                 "64 distinct adapters": [f"nola-{i % 64}" for i in range(requests)],
                 "1000 adapters / 64 slots": [f"nola-{rng.randrange(1000)}"
                                              for _ in range(requests)]}
    run_batch(engine, prompts[:8], [None] * 8, 4)  # warm-up (Triton compiles here)
    run_batch(engine, prompts[:64], scenarios["64 distinct adapters"][:64], 2)
    print(f"\nengine on {label}: {requests} requests x {max_tokens} tokens")
    base = None
    for name, adapters in scenarios.items():
        torch.cuda.synchronize()
        tps = run_batch(engine, prompts, adapters, max_tokens)
        base = base or tps
        print(f"{name:28s} {tps:9.1f} tok/s {tps / base:6.2f} x base")


def bench_engine(requests: int, max_tokens: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from nolaserve.server.engine.model_loader import load_model

    bench_engine_on("SmolLM2-135M", requests, max_tokens)
    _, tokenizer = load_model(None, device="cpu", dtype="float32")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).to(torch.bfloat16).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e9
    bench_engine_on(f"random Llama ({params:.2f} B params)", requests, max_tokens,
                    model=model, tokenizer=tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="a few sizes of each part")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    parts = set(args.only.split(","))
    if unknown := parts - set(PARTS):
        parser.error(f"unknown parts {sorted(unknown)}")
    if not torch.cuda.is_available():
        print("benchmarks.gpu: no CUDA device here; nothing to measure (the Triton kernels are "
              "tested on CPU by tests/test_triton_kernels.py under TRITON_INTERPRET=1)")
        return
    try:
        import triton  # noqa: F401
    except ImportError:
        print("benchmarks.gpu: triton is not installed (pip install 'nolaserve[gpu]'); skipping")
        return
    print(f"device: {torch.cuda.get_device_name()}")
    if "ops" in parts:
        gpu_kernels.bench_sgmv(slots_for, SPREADS[:2] if args.quick else SPREADS,
                               TOKENS[3:4] if args.quick else TOKENS)
        gpu_kernels.bench_sgmv_multi(slots_for, TOKENS[3:4] if args.quick else TOKENS[:5])
        gpu_kernels.bench_decode_lora()
    if "attention" in parts:
        gpu_kernels.bench_attention(CONTEXTS[:1] if args.quick else CONTEXTS)
    if "regen" in parts:
        bench_regen()
    if "engine" in parts:
        bench_engine(8 if args.quick else args.requests, 4 if args.quick else args.max_tokens)


if __name__ == "__main__":
    main()
