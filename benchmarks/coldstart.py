"""Cold adapters under slot thrash: TTFT of hot vs cold requests, nolaserve against vLLM.

    python -m nolaserve.benchmarks.coldstart [--slots 8] [--requests 120] [--rate 4]

One run, the embedded SmolLM2-135M-Instruct (fp32). ``4 x slots`` distinct NOLA adapters
(q_proj + v_proj, r=8, k=l=256; vLLM gets the same factors as PEFT LoRA directories).
Per popularity exponent alpha (S-LoRA's power law, ``p(adapter i) ~ (i+1)^-alpha``,
default {0.3, 1}) one trace: Poisson arrivals at ``--rate`` requests/s, prompts of 16-48
random tokens, ``--max-tokens`` new tokens, greedy, EOS ignored. Every system replays the
same traces, and a base-only copy of them (no adapters), in the same order.

A request is *cold* when its adapter is not among the ``slots`` most recently requested
ones at its arrival (an LRU over the trace, the same split for every system), else *hot*.
Reported per system and trace: TTFT p50/p99 of hot and of cold requests, generated tok/s
over the makespan against the base-only copy, the base-only copy's TTFT p99 (what the
system does with no adapters at all: a floor for the adapter trace's), and nolaserve's
loads, evictions and warm tier hits, requests parked by time slicing, how long its loads
took and how long cold requests waited for their slot (the loader, or a free slot), and
what reloading an evicted adapter costs. Systems: nolaserve with time slicing
(``--quantum``) and the warm tier (``--warm-mib``), without the warm tier, and without
time slicing; vLLM (``--vllm-python``) with ``max_loras = slots`` and ``max_cpu_loras =
2 x slots`` (below the number of adapters, so it reloads from disk).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch

from nolaserve.benchmarks.compare import make_adapter, write_peft_dir
from nolaserve.benchmarks.vllm_runs import VLLM_PYTHON, run_vllm_job, vllm_available
from nolaserve.server.build import build_engine
from nolaserve.server.config import Config
from nolaserve.server.engine import model_loader as ml
from nolaserve.server.engine.engine import Engine
from nolaserve.server.engine.sequence import SamplingParams


def make_trace(n: int, rate: float, alpha: float, num_adapters: int, vocab: int,
               max_tokens: int, seed: int) -> list[dict]:
    """Poisson arrivals, power-law adapter popularity (adapter ``-1`` = base model)."""
    rng = random.Random(seed)
    weights = [(i + 1) ** -alpha for i in range(num_adapters)]
    t, trace = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        trace.append({"arrival": t, "max_tokens": max_tokens,
                      "prompt": [rng.randrange(100, vocab) for _ in range(rng.randint(16, 48))],
                      "adapter": rng.choices(range(num_adapters), weights)[0]})
    return trace


def cold_mask(trace: list[dict], slots: int) -> list[bool]:
    """Whether each request's adapter is outside the ``slots`` most recently requested."""
    lru: OrderedDict[int, None] = OrderedDict()
    cold = []
    for r in trace:
        cold.append(r["adapter"] not in lru)
        lru[r["adapter"]] = None
        lru.move_to_end(r["adapter"])
        if len(lru) > slots:
            lru.popitem(last=False)
    return cold


def replay(engine: Engine, trace: list[dict]) -> dict:
    """Submit each request when it comes due, step while any is unfinished."""
    start, pending, n = time.perf_counter(), list(trace), len(trace)
    first: dict[str, float] = {}
    tokens = 0
    while pending or engine.has_unfinished():
        now = time.perf_counter() - start
        while pending and pending[0]["arrival"] <= now:
            r = pending.pop(0)
            params = SamplingParams(max_tokens=r["max_tokens"], temperature=0.0,
                                    ignore_eos=True)
            adapter = f"nola-{r['adapter']}" if r["adapter"] >= 0 else None
            engine.add_request(str(n - len(pending) - 1), r["prompt"], params, adapter)
        if not engine.has_unfinished():
            time.sleep(max(0.0, pending[0]["arrival"] - (time.perf_counter() - start)))
            continue
        for out in engine.step():
            if out.token_ids and out.request_id not in first:
                first[out.request_id] = time.perf_counter() - start
            tokens += len(out.token_ids)
    ttft = [first[str(i)] - r["arrival"] for i, r in enumerate(trace)]
    return {"ttft": ttft, "tokens": tokens, "seconds": time.perf_counter() - start,
            "start": start}


class LoadProbe:
    """Benchmark only: how long each of an engine's loads took (``observe_loads``) and when
    each request got its slot (it wraps the admission's private ``_admitted``), to tell a
    wait for the loader from a wait for a free slot."""

    def __init__(self, engine: Engine) -> None:
        self.loads: list[float] = []
        self.admitted: dict[str, float] = {}
        engine.store.observe_loads(self.loads.append)
        admission, admitted = engine.admission, engine.admission._admitted

        def probe(seq, slot: int) -> None:
            self.admitted.setdefault(seq.request_id, time.perf_counter())
            admitted(seq, slot)

        admission._admitted = probe

    def clear(self) -> None:
        self.loads.clear()
        self.admitted.clear()

    def summary(self, result: dict, trace: list[dict], mask: list[bool]) -> str:
        waits = [self.admitted[str(i)] - result["start"] - r["arrival"]
                 for i, r in enumerate(trace) if mask[i] and str(i) in self.admitted]
        if not self.loads or not waits:
            return "no loads"
        return (f"loads median {pct(self.loads, .5) * 1e3:.0f} ms, max "
                f"{max(self.loads) * 1e3:.0f} ms, {sum(self.loads):.1f} s in all; cold "
                f"requests' wait for their slot p50 {pct(waits, .5):.2f} s, p99 "
                f"{pct(waits, .99):.2f} s")


def reload_ms(engine: Engine, n: int) -> float:
    """Median ms of acquiring each of adapters ``0..n-1`` after all were loaded once and the
    first ones evicted again (``n`` > slots): a regeneration, or a warm-tier copy."""
    def acquire_all() -> list[float]:
        times = []
        for i in range(n):
            t = time.perf_counter()
            engine.store.release(engine.store.acquire(f"nola-{i}"))
            times.append(time.perf_counter() - t)
        return times

    acquire_all()
    return pct(acquire_all(), .5) * 1e3


def base_only(trace: list[dict]) -> list[dict]:
    return [dict(r, adapter=-1) for r in trace]


def bench_nolaserve(args, traces: dict, masks: dict, warm_bytes: int, quantum_steps: int
                    ) -> tuple[dict, list[str]]:
    model, tokenizer = ml.load_model(device="cpu", dtype="float32")
    config = Config(registry_path=":memory:", num_slots=args.slots, max_rank=8,
                    max_num_seqs=64, max_num_batched_tokens=1024, kv_cache_bytes=256 << 20,
                    warm_cache_bytes=warm_bytes, materialize_threads=args.materialize_threads,
                    admission_quantum_steps=quantum_steps)
    engine = build_engine(config, model=model, tokenizer=tokenizer)
    for i in range(4 * args.slots):
        engine.store.register(f"nola-{i}", make_adapter(engine.store.spec, i).to_bytes())
    replay(engine, [{"arrival": 0.0, "prompt": [100, 101, 102], "adapter": -1,
                     "max_tokens": 2}])  # warm-up
    notes = [f"reloading an evicted adapter: {reload_ms(engine, 2 * args.slots):.1f} ms "
             "(median)"]
    results, probe = {}, LoadProbe(engine)
    for name, trace in traces.items():
        before, parked = engine.store.stats, engine.admission.parked
        probe.clear()
        results[name] = replay(engine, trace)
        after = engine.store.stats
        warm = (f", warm tier {after.warm.hits - before.warm.hits} hits / "
                f"{after.warm.misses - before.warm.misses} misses" if after.warm else "")
        notes.append(f"{name}: {after.slots.misses - before.slots.misses} loads, "
                     f"{after.slots.evictions - before.slots.evictions} evictions{warm}, "
                     f"{engine.admission.parked - parked} requests parked")
        if name in masks:
            notes[-1] += "; " + probe.summary(results[name], trace, masks[name])
    engine.close()
    return results, notes


def bench_vllm(args, traces: dict, tmp: Path) -> dict | None:
    if not vllm_available(args.vllm_python):
        return None
    model_dir = str(ml.gguf_cache_path(ml.default_model_path(), ml.default_cache_dir()))
    from nolaserve.benchmarks.adapters import SMOLLM2
    dirs = [tmp / f"a{i}" for i in range(4 * args.slots)]
    for i, d in enumerate(dirs):
        write_peft_dir(make_adapter(SMOLLM2, i), d, model_dir)
    job = {"model": model_dir, "adapters": [str(d) for d in dirs], "max_loras": args.slots,
           "max_cpu_loras": 2 * args.slots, "max_lora_rank": 8, "dtype": "float32",
           "threads": args.threads, "traces": traces}
    return run_vllm_job(args.vllm_python, "vllm_trace.py", job, tmp, args.vllm_timeout,
                        OMP_NUM_THREADS=str(args.threads))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def print_rows(system: str, results: dict, masks: dict) -> None:
    for name, mask in masks.items():
        r, base = results[name], results[f"{name}, base only"]
        hot = [t for t, c in zip(r["ttft"], mask) if not c]
        cold = [t for t, c in zip(r["ttft"], mask) if c]
        tps, base_tps = r["tokens"] / r["seconds"], base["tokens"] / base["seconds"]
        print(f"{system:22s} {name:10s} {len(cold):3d}/{len(mask):3d} "
              f"{pct(hot, .5) * 1e3:7.0f} {pct(hot, .99) * 1e3:7.0f} "
              f"{pct(cold, .5) * 1e3:7.0f} {pct(cold, .99) * 1e3:7.0f} "
              f"{pct(cold, .99) / pct(hot, .99):6.2f} {pct(r['ttft'], .99) * 1e3:7.0f} "
              f"{tps:6.1f} {tps / base_tps:5.2f} {pct(base['ttft'], .99) * 1e3:7.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.3, 1.0])
    parser.add_argument("--warm-mib", type=int, default=256)
    parser.add_argument("--materialize-threads", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads of the step (both systems)")
    parser.add_argument("--vllm-python", default=VLLM_PYTHON)
    parser.add_argument("--vllm-timeout", type=int, default=1800)
    parser.add_argument("--quantum", type=int, default=Config.admission_quantum_steps,
                        help="admission_quantum_steps of the time-slicing systems")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["vllm", "warm", "nowarm", "noslice"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    traces, masks = {}, {}
    for k, alpha in enumerate(args.alphas):
        trace = make_trace(args.requests, args.rate, alpha, 4 * args.slots, 49152,
                           args.max_tokens, seed=k)
        traces[f"alpha {alpha:g}"] = trace
        traces[f"alpha {alpha:g}, base only"] = base_only(trace)
        masks[f"alpha {alpha:g}"] = cold_mask(trace, args.slots)
    print(f"{args.requests} requests/trace at {args.rate:g}/s, {4 * args.slots} adapters over "
          f"{args.slots} slots, {args.max_tokens} tokens, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'system':22s} {'trace':10s} {'cold':>7s} {'hot p50':>7s} {'hot p99':>7s} "
          f"{'cold50':>7s} {'cold99':>7s} {'c/h99':>6s} {'all p99':>7s} {'tok/s':>6s} "
          f"{'xbase':>5s} {'base99':>7s}   (TTFT ms; base99: all p99 of the base-only copy)")
    warm = args.warm_mib << 20
    systems = [("nolaserve, no warm tier", 0, args.quantum, "nowarm"),
               ("nolaserve", warm, args.quantum, "warm"),
               ("nolaserve, no slicing", warm, 0, "noslice")]
    for system, warm_bytes, quantum, key in systems:
        if key not in args.skip:
            results, notes = bench_nolaserve(args, traces, masks, warm_bytes, quantum)
            print_rows(system, results, masks)
            print("\n".join("    " + note for note in notes))
    if "vllm" not in args.skip:
        with tempfile.TemporaryDirectory() as tmp:
            results = bench_vllm(args, traces, Path(tmp))
        if results is not None:
            print_rows(f"vLLM max_loras {args.slots}", results, masks)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
