"""Decode throughput on one GPU with a random-weight Llama-3-8B-shaped model (bf16), built
in memory: no download.

    python -m nolaserve.benchmarks.gpu_8b [--requests 64] [--max-tokens 128]

Reports, in one run (about 5 minutes on an H100/H200):

- the physical limit: weight bytes / measured HBM bandwidth (a large device copy) = the
  shortest decode step, and the tok/s it allows at ``--requests`` sequences;
- nolaserve's decode step (ms, and x the floor) and tok/s at ``--batches`` sequences (1,
  64, 256) for base only, 64 distinct NOLA adapters (q/k/v/o, r=16, k=l=128) and 1,000
  registered adapters over 64 slots, graphed (the decode road, CUDA graphs) and eager,
  the KV cache sized by ``gpu_memory_utilization``;
- HF PEFT mixed-batch ``generate`` on the same weights with 64 LoRA adapters of the same
  shape (``adapter_names`` per row).

Without CUDA it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]


class NullTokenizer:
    """Enough of a tokenizer for the engine's detokenizer: ids decode to nothing."""

    eos_token_id = None

    def decode(self, ids, **kwargs) -> str:
        return ""


def random_llama(shape: dict, device: str):
    """A Llama of ``shape`` in bf16 with transformers' random init, drawn on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**shape))
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def unwrap(model) -> None:
    """Put the base linears back where the engine wrapped them (for PEFT after it)."""
    from nolaserve.server.engine.lora_layers import LoraLinear

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoraLinear):
                setattr(module, name, child.base)


def hbm_bound(model, requests: int) -> float:
    """Prints and returns the shortest decode step in seconds (0 without CUDA)."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if not torch.cuda.is_available():
        print(f"weights {weight_bytes / 2**30:.2f} GiB (no HBM to measure)")
        return 0.0
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    bandwidth = 2 * src.numel() * 10 / (time.perf_counter() - t)  # read + write
    del src, dst
    step = weight_bytes / bandwidth
    print(f"weights {weight_bytes / 2**30:.1f} GiB; measured HBM bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s; decode step >= {1e3 * step:.2f} ms, so at most "
          f"{requests / step:,.0f} tok/s at {requests} sequences")
    return step


def decode_tps(engine, prompts, adapters, max_tokens: int) -> tuple[float, float, float]:
    """(tok/s over the whole run, tok/s over decode steps only, ms per decode step)."""
    from nolaserve.server.engine.sequence import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, (p, a) in enumerate(zip(prompts, adapters)):
        engine.add_request(f"g{i}", p, params, a)
    start, generated, decode_s, decode_tokens, steps = time.perf_counter(), 0, 0.0, 0, 0
    while engine.has_unfinished():
        prefilling = any(s.num_computed_tokens < s.num_prompt_tokens
                         for s in engine.scheduler.running) or engine.scheduler.num_waiting
        t = time.perf_counter()
        n = sum(len(o.token_ids) for o in engine.step())
        if not prefilling:
            decode_s += time.perf_counter() - t
            decode_tokens += n
            steps += 1
        generated += n
    return (generated / (time.perf_counter() - start), decode_tokens / max(decode_s, 1e-9),
            1e3 * decode_s / max(steps, 1))


def bench_nolaserve(model, args, floor: float) -> None:
    """Every batch size and scenario, with the decode road (CUDA graphs) and without it
    (``enforce_eager``: the packed eager path), on one engine: the road is switched off by
    setting ``runner.decode`` aside."""
    from nolaserve.adapters.nola import random_nola
    from nolaserve.server.build import build_engine
    from nolaserve.server.config import Config

    config = Config(registry_path=":memory:", device=args.device, dtype="bfloat16",
                    num_slots=64, max_rank=16, max_num_seqs=max(args.batches),
                    max_num_batched_tokens=4096, target_modules=TARGETS)
    t = time.perf_counter()
    engine = build_engine(config, model=model, tokenizer=NullTokenizer())
    bm, road = engine.scheduler.block_manager, engine.runner.decode
    graphs = len(road.graphs) if road is not None else 0
    print(f"engine built in {time.perf_counter() - t:.1f} s (profiling, warm-up, {graphs} "
          f"CUDA graphs): {bm.num_blocks} KV blocks = {bm.max_tokens:,} tokens")
    t = time.perf_counter()
    for i in range(1000):
        engine.store.register(f"n{i}", random_nola(engine.store.spec, seed=i, rank=16,
                                                   num_basis=128, targets=TARGETS,
                                                   coeff_std=0.05).to_bytes())
    print(f"registered 1,000 NOLA adapters in {time.perf_counter() - t:.1f} s")
    rng = random.Random(0)
    for n in args.batches:
        prompts = [[rng.randrange(100, args.vocab) for _ in range(args.prompt_tokens)]
                   for _ in range(n)]
        scenarios = {"base only": [None] * n,
                     "64 distinct adapters": [f"n{i % 64}" for i in range(n)],
                     "1,000 adapters / 64 slots": [f"n{rng.randrange(1000)}" for _ in range(n)]}
        decode_tps(engine, prompts, scenarios["64 distinct adapters"], 2)  # loads adapters
        for mode, decode in (("graphed", road), ("eager", None)):
            engine.runner.decode, base = decode, None
            for name, adapters in scenarios.items():
                total, tps, step = decode_tps(engine, prompts, adapters, args.max_tokens)
                base = base or tps
                vs = f", {step / (1e3 * floor):.2f}x the HBM floor" if floor else ""
                print(f"batch {n:3d} {mode:7s} {name:26s} step {step:7.2f} ms{vs}; "
                      f"{tps:9.1f} tok/s decode ({tps / base:.2f}x base), {total:9.1f} overall")
    engine.runner.decode = road
    engine.close()


def bench_peft(model, args) -> None:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=16, lora_alpha=32, target_modules=[t.rsplit(".")[-1]
                                                             for t in TARGETS],
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config, adapter_name="a0")
    for i in range(1, 64):
        peft_model.add_adapter(f"a{i}", config)
    peft_model.eval()
    rng = random.Random(0)
    ids = torch.tensor([[rng.randrange(100, args.vocab) for _ in range(args.prompt_tokens)]
                        for _ in range(args.requests)], device=args.device)
    names = [f"a{i % 64}" for i in range(args.requests)]
    for label, adapter_names in (("base only", ["__base__"] * args.requests),
                                 ("64 distinct adapters", names)):
        sync(args.device)
        t = time.perf_counter()
        with torch.inference_mode():
            out = peft_model.generate(input_ids=ids, adapter_names=adapter_names,
                                      do_sample=False, max_new_tokens=args.max_tokens,
                                      min_new_tokens=args.max_tokens, pad_token_id=0)
        sync(args.device)
        tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
        print(f"HF PEFT {label:28s} {tokens / (time.perf_counter() - t):9.1f} tok/s "
              f"(mixed-batch generate, prefill included)")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64, help="batch of the PEFT run")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256],
                        help="decode batch sizes of the nolaserve runs")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--skip", nargs="*", default=[], choices=["peft", "nolaserve"])
    parser.add_argument("--tiny", action="store_true",
                        help="a 2-layer model of the same widths' ratios: checks the script "
                             "itself (with --device cpu) in seconds")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks.gpu_8b: no CUDA device here; nothing to measure")
        return
    shape = dict(LLAMA3_8B, hidden_size=128, intermediate_size=448, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=1, vocab_size=4096) \
        if args.tiny else LLAMA3_8B
    args.vocab = shape["vocab_size"]
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device: {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    t = time.perf_counter()
    model = random_llama(shape, args.device)
    print(f"random Llama-3-8B-shaped model ({'tiny' if args.tiny else 'full'}) built in "
          f"{time.perf_counter() - t:.1f} s")
    floor = hbm_bound(model, args.requests)
    if "nolaserve" not in args.skip:
        bench_nolaserve(model, args, floor)
        unwrap(model)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if "peft" not in args.skip:
        model.set_attn_implementation("sdpa")  # the engine switched it to the paged one
        bench_peft(model, args)


if __name__ == "__main__":
    main()
