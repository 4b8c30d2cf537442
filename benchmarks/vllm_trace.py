"""vLLM side of ``benchmarks.coldstart``: replay a timed trace, run by the vLLM
virtualenv's python (imports no nolaserve).

    /opt/vllm-venv/bin/python vllm_trace.py job.json

``job.json``: ``model`` (local checkpoint dir), ``adapters`` (PEFT LoRA dirs),
``max_loras``, ``max_cpu_loras``, ``max_lora_rank``, ``dtype`` and ``traces`` (name ->
list of ``{"arrival": s, "prompt": [ids], "adapter": index or -1, "max_tokens": n}``).
Each trace is replayed through ``LLMEngine.add_request``/``step`` as requests come due
(the same loop as the nolaserve side). Prints one line ``RESULT {json}``: per trace, each
request's TTFT (seconds), the generated tokens and the makespan.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def replay(engine, trace: list[dict], loras: list, sampling) -> dict:
    start, pending, n = time.perf_counter(), list(trace), len(trace)
    first: dict[str, float] = {}
    tokens = 0
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and pending[0]["arrival"] <= now:
            r = pending.pop(0)
            rid = str(n - len(pending) - 1)
            engine.add_request(rid, {"prompt_token_ids": r["prompt"]},
                               sampling(max_tokens=r["max_tokens"], temperature=0.0,
                                        ignore_eos=True),
                               arrival_time=None,
                               lora_request=loras[r["adapter"]] if r["adapter"] >= 0 else None)
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, pending[0]["arrival"] - (time.perf_counter() - start)))
            continue
        for out in engine.step():
            if out.outputs and out.outputs[0].token_ids and out.request_id not in first:
                first[out.request_id] = time.perf_counter() - start
            if out.finished:
                tokens += len(out.outputs[0].token_ids)
    makespan = time.perf_counter() - start
    ttft = [first[str(i)] - r["arrival"] for i, r in enumerate(trace)]
    return {"ttft": ttft, "tokens": tokens, "seconds": makespan}


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    job = json.loads(Path(sys.argv[1]).read_text())
    import torch
    torch.set_num_threads(job.get("threads", torch.get_num_threads()))
    t = time.perf_counter()
    llm = LLM(model=job["model"], tokenizer=job["model"], dtype=job["dtype"],
              enable_lora=True, max_loras=job["max_loras"], max_lora_rank=job["max_lora_rank"],
              max_cpu_loras=job["max_cpu_loras"], max_num_seqs=64, max_model_len=256,
              enforce_eager=True, seed=0)
    print(f"vLLM ready in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    loras = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(job["adapters"])]
    engine = llm.llm_engine
    warm = [{"arrival": 0.0, "prompt": [100, 101, 102], "adapter": -1, "max_tokens": 2}]
    replay(engine, warm, loras, SamplingParams)
    results = {name: replay(engine, trace, loras, SamplingParams)
               for name, trace in job["traces"].items()}
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
