"""nolaserve against HF PEFT and vLLM: generated tokens/s, same machine, model, adapters.

    python -m nolaserve.benchmarks.compare [--requests 64] [--max-tokens 32]

One run, the embedded SmolLM2-135M-Instruct (fp32), the same prompts (random token ids),
greedy, EOS ignored, the same ``max_tokens``. The adapters are NOLA adapters (q_proj +
v_proj, r=8, k=l=256, coefficient std 0.1): nolaserve serves them as NOLA; PEFT and vLLM
get their materialized factors as PEFT LoRA directories (same ``delta W``). Systems:

- nolaserve engine in process: base only; 1, 8, 64 distinct adapters in flight;
  1,000 registered adapters over 64 slots;
- HF PEFT: ``PeftModel`` with the adapters loaded, mixed-batch
  ``generate(..., adapter_names=[...])``, left padding, ``--peft-batch`` rows a call;
- vLLM (``--vllm-python``, a separate virtualenv) with ``enable_lora``, once per
  ``--max-loras`` value (default 8, below the number of distinct adapters in flight, and
  64, its best setting for 64 distinct adapters), ``max_cpu_loras`` holding them all;
- nolaserve with ``engine: vllm`` (``--vllm-backend-python``, a virtualenv with vLLM and
  nolaserve): the same vLLM settings, the adapters registered as NOLA and materialized by
  nolaserve into PEFT directories, every request through ``VllmEngine.generate``.

Prints a table: system, scenario, tok/s, ratio to nolaserve base only.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from nolaserve.adapters.nola import NolaAdapter, random_nola
from nolaserve.benchmarks.engine import TARGETS, workload_parser
from nolaserve.benchmarks.vllm_runs import (
    VLLM_PYTHON,
    Row,
    bench_vllm_backend,
    bench_vllm_each,
    first_max_loras,
)
from nolaserve.server.build import build_engine
from nolaserve.server.config import Config
from nolaserve.server.engine import model_loader as ml
from nolaserve.server.engine.engine import Engine
from nolaserve.server.engine.sequence import SamplingParams


def write_peft_dir(adapter: NolaAdapter, directory: Path, base_path: str) -> None:
    """The adapter's materialized factors as a PEFT LoRA directory (same ``delta W``)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (i, name), f in adapter.materialize().modules.items():
        key = f"base_model.model.model.layers.{i}.{name}"
        tensors[f"{key}.lora_A.weight"] = f.A.contiguous()
        tensors[f"{key}.lora_B.weight"] = f.B.contiguous()
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": adapter.rank,
              "lora_alpha": adapter.lora_alpha, "lora_dropout": 0.0, "bias": "none",
              "target_modules": [t.rsplit(".", 1)[-1] for t in adapter.target_modules],
              "base_model_name_or_path": base_path, "fan_in_fan_out": False}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=1))


def run_engine(engine: Engine, prompts: list[list[int]], adapters: list[str | None],
               max_tokens: int) -> tuple[float, list[int]]:
    """Generated tokens/s with every request submitted at once, and request 0's tokens."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start, generated, first = time.perf_counter(), 0, []
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters)):
        engine.add_request(f"c{i}", prompt, params, adapter)
    while engine.has_unfinished():
        for o in engine.step():
            generated += len(o.token_ids)
            if o.request_id == "c0":
                first += o.token_ids
    return generated / (time.perf_counter() - start), first


def bench_nolaserve(args, model, tokenizer, prompts, scenarios) -> tuple[list[Row], dict]:
    config = Config(registry_path=":memory:", num_slots=64, max_rank=8,
                    max_num_seqs=args.requests, max_num_batched_tokens=1024,
                    kv_cache_bytes=256 << 20)
    engine = build_engine(config, model=model, tokenizer=tokenizer)
    for i in range(args.registered):
        engine.store.register(f"nola-{i}", make_adapter(engine.store.spec, i).to_bytes())
    run_engine(engine, prompts[:8], [None] * 8, 4)  # warm-up
    rows, first = [], {}
    for name, picks in scenarios.items():
        adapters = [f"nola-{i}" if i >= 0 else None for i in picks]
        if not name.endswith("slots"):  # load this scenario's adapters outside the timing
            run_engine(engine, prompts, adapters, 1)
        tps, first[name] = run_engine(engine, prompts, adapters, args.max_tokens)
        rows.append(("nolaserve", name, tps))
    stats = engine.store.stats.slots
    print(f"nolaserve slot pool: {stats.misses} loads, {stats.evictions} evictions, "
          f"{stats.materialize_seconds:.1f} s materializing")
    return rows, first


def make_adapter(spec, i: int) -> NolaAdapter:
    return random_nola(spec, seed=i, rank=8, num_basis=256, targets=TARGETS, coeff_std=0.1)


def bench_peft(args, dirs: list[Path], prompts, scenarios) -> tuple[list[Row], dict]:
    from peft import PeftModel

    model, tokenizer = ml.load_model(device="cpu", dtype="float32")
    names = [f"a{i}" for i in range(len(dirs))]
    peft_model = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name=names[0])
    for name, d in zip(names[1:], dirs[1:]):
        peft_model.load_adapter(str(d), adapter_name=name)
    peft_model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def generate(picks: list[int], max_tokens: int) -> tuple[float, list[int]]:
        start, generated, first = time.perf_counter(), 0, []
        for lo in range(0, len(picks), args.peft_batch):
            batch = prompts[lo:min(lo + args.peft_batch, len(picks))]
            width = max(map(len, batch))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            adapter_names = [names[i] if i >= 0 else "__base__"
                             for i in picks[lo:lo + args.peft_batch]]
            with torch.inference_mode():
                out = peft_model.generate(input_ids=ids, attention_mask=mask,
                                          adapter_names=adapter_names, do_sample=False,
                                          max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                          pad_token_id=pad)
            generated += (out.shape[1] - width) * len(batch)
            first = first or out[0, width:].tolist()
        return generated / (time.perf_counter() - start), first

    generate([-1] * 8, 4)  # warm-up
    rows, first = [], {}
    for name, picks in scenarios.items():
        tps, first[name] = generate(picks, args.max_tokens)
        rows.append(("HF PEFT", name, tps))
    return rows, first


def main() -> None:
    parser = workload_parser(__doc__.splitlines()[0])
    parser.add_argument("--peft-batch", type=int, default=64)
    parser.add_argument("--max-loras", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--vllm-python", default=VLLM_PYTHON)
    parser.add_argument("--vllm-timeout", type=int, default=900)
    parser.add_argument("--vllm-compile", action="store_true",
                        help="let vLLM compile (slow to start on CPU); default enforce_eager")
    parser.add_argument("--vllm-backend-python",
                        default=os.environ.get("NOLASERVE_VLLM_PYTHON", ""),
                        help="python of a virtualenv with vLLM and nolaserve, for the "
                             "'nolaserve (vllm backend)' rows")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["peft", "vllm", "vllm-backend"])
    args = parser.parse_args()
    n = args.requests
    model, tokenizer = ml.load_model(device="cpu", dtype="float32")
    model_dir = str(ml.gguf_cache_path(ml.default_model_path(), ml.default_cache_dir()))
    rng = random.Random(0)
    vocab = model.config.vocab_size
    prompts = [[rng.randrange(100, vocab) for _ in range(rng.randint(*args.prompt_tokens))]
               for _ in range(n)]
    scenarios = {"base only": [-1] * n, "1 adapter": [0] * n,
                 "8 distinct adapters": [i % 8 for i in range(n)],
                 "64 distinct adapters": [i % 64 for i in range(n)],
                 f"{args.registered:,} adapters / 64 slots": [rng.randrange(args.registered)
                                                for _ in range(n)]}
    print(f"{n} requests x {args.max_tokens} tokens, prompts {args.prompt_tokens[0]}-"
          f"{args.prompt_tokens[1]} tokens, {torch.get_num_threads()} threads, fp32")
    rows, firsts = bench_nolaserve(args, model, tokenizer, prompts, scenarios)
    del model
    others = {k: v for k, v in scenarios.items() if k in
              ("base only", "8 distinct adapters", "64 distinct adapters")}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        from nolaserve.adapters.spec import BaseModelSpec
        spec = BaseModelSpec(num_layers=30, module_shapes={"self_attn.q_proj": (576, 576),
                                                           "self_attn.v_proj": (576, 192)})
        dirs = [tmp / f"a{i}" for i in range(64)]
        for i, d in enumerate(dirs):
            write_peft_dir(make_adapter(spec, i), d, model_dir)
        for system, fn in (("peft", lambda: bench_peft(args, dirs, prompts, others)),
                           ("vllm", lambda: bench_vllm_each(args, model_dir, dirs, prompts,
                                                            others, tmp)),
                           ("vllm-backend", lambda: bench_vllm_backend(
                               first_max_loras(args), model_dir, prompts, others, tmp))):
            if system not in args.skip:
                more, first = fn()
                rows += more
                firsts.update({f"{system}: {k}": v for k, v in first.items()})
    print_table(rows, firsts)


def print_table(rows: list[Row], firsts: dict) -> None:
    base = rows[0][2]
    print(f"\n{'system':24s} {'scenario':40s} {'tok/s':>8s} {'x nolaserve base':>17s}")
    for system, name, tps in rows:
        print(f"{system:24s} {name:40s} {tps:8.1f} {tps / base:17.2f}")
    ref = firsts.get("64 distinct adapters", [])
    for key, tokens in firsts.items():
        if "64 distinct adapters" in key and key != "64 distinct adapters":
            same = sum(a == b for a, b in zip(ref, tokens))
            print(f"request 0 (adapter 0), {key}: {same}/{len(ref)} tokens equal to nolaserve's")


if __name__ == "__main__":
    main()
