"""vLLM side of ``benchmarks.prefix_chat``, run by the vLLM virtualenv's python (imports no
nolaserve): the same multi-turn chat trace with vLLM's prefix caching on.

    /work/vllm-venv/bin/python prefix_chat_vllm.py job.json

``job.json``: ``model``, ``lora_dirs`` (PEFT LoRA dirs), ``system``, ``users`` (per turn,
per conversation), ``adapters`` (per conversation), ``max_tokens``. Prints one line
``RESULT {json}``: TTFT p50/p99 (seconds), generated tokens/s, vLLM's hit rate.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path


def turn(engine, prompts, loras, sampling) -> tuple[list[float], list[list[int]]]:
    start, first, replies = time.perf_counter(), {}, [[] for _ in prompts]
    for i, (prompt, lora) in enumerate(zip(prompts, loras)):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, sampling, lora_request=lora)
    while engine.has_unfinished_requests():
        for out in engine.step():
            i = int(out.request_id)
            if out.outputs and out.outputs[0].token_ids:
                first.setdefault(i, time.perf_counter() - start)
            if out.finished:
                replies[i] = list(out.outputs[0].token_ids)
    return [first[i] for i in range(len(prompts))], replies


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    job = json.loads(Path(sys.argv[1]).read_text())
    longest = len(job["system"]) + len(job["users"]) * (len(job["users"][0][0])
                                                        + job["max_tokens"])
    llm = LLM(model=job["model"], tokenizer=job["model"], dtype="float32", enable_lora=True,
              max_loras=len(job["lora_dirs"]), max_lora_rank=8,
              max_cpu_loras=len(job["lora_dirs"]), max_num_seqs=64,
              max_model_len=longest + 16, enforce_eager=True, seed=0,
              enable_prefix_caching=True)
    loras = [LoRARequest(f"a{i}", i + 1, d) for i, d in enumerate(job["lora_dirs"])]
    convs = [loras[a] for a in job["adapters"]]
    sampling = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, ignore_eos=True)
    engine = llm.llm_engine
    turn(engine, [[100 + i, 101] for i in range(len(loras))], loras,
         SamplingParams(max_tokens=1))  # load the adapters
    histories = [list(job["system"]) for _ in convs]
    ttfts, tokens, start = [], 0, time.perf_counter()
    for users in job["users"]:
        prompts = [h + u for h, u in zip(histories, users)]
        times, replies = turn(engine, prompts, convs, sampling)
        ttfts += times
        tokens += sum(map(len, replies))
        histories = [p + r for p, r in zip(prompts, replies)]
    seconds = time.perf_counter() - start
    ttfts.sort()
    print("RESULT " + json.dumps({
        "ttft_p50": statistics.median(ttfts),
        "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        "tok_s": tokens / seconds}), flush=True)


if __name__ == "__main__":
    main()
