"""vLLM side of ``benchmarks.compare``, run by the vLLM virtualenv's python (imports no nolaserve).

    /opt/vllm-venv/bin/python vllm_worker.py job.json

``job.json``: ``model`` (local checkpoint dir), ``adapters`` (PEFT LoRA dirs), ``prompts``
(token ids), ``max_tokens``, ``max_loras``, ``max_cpu_loras``, ``dtype`` and
``scenarios`` (name -> adapter index per request, ``-1`` for none). Prints one line
``RESULT {json}`` with generated tokens/s per scenario and the first request's tokens.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    job = json.loads(Path(sys.argv[1]).read_text())
    llm = LLM(model=job["model"], tokenizer=job["model"], dtype=job["dtype"],
              enable_lora=True, max_loras=job["max_loras"], max_lora_rank=8,
              max_cpu_loras=job["max_cpu_loras"], max_num_seqs=len(job["prompts"]),
              max_model_len=256, enforce_eager=job.get("enforce_eager", True), seed=0)
    loras = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(job["adapters"])]
    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]

    def run(picks: list[int], max_tokens: int) -> tuple[float, list[int]]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        reqs = [loras[i] if i >= 0 else None for i in picks]
        start = time.perf_counter()
        outs = llm.generate(prompts[:len(picks)], params, lora_request=reqs, use_tqdm=False)
        seconds = time.perf_counter() - start
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        return generated / seconds, list(outs[0].outputs[0].token_ids)

    run([-1] * 8, 4)  # warm-up
    results, first = {}, {}
    for name, picks in job["scenarios"].items():
        run(picks, 1)  # load this scenario's adapters into the CPU cache outside the timing
        results[name], first[name] = run(picks, job["max_tokens"])
    print("RESULT " + json.dumps({"tok_s": results, "first": first}), flush=True)


if __name__ == "__main__":
    main()
