"""The "nolaserve (vllm backend)" side of ``benchmarks.compare``, run by the python of a
virtualenv that has both vLLM and nolaserve (``--vllm-backend-python``):

    python -m nolaserve.benchmarks.vllm_backend_worker job.json

``job.json``: ``model`` (checkpoint dir), ``prompts`` (token ids), ``max_tokens``,
``max_loras``, ``max_cpu_loras``, ``num_adapters`` and ``scenarios`` (name -> adapter
index per request, ``-1`` for none). The adapters are the same random NOLA adapters as
the other systems' (``compare.make_adapter``), registered as NOLA: nolaserve materializes
them into PEFT directories for vLLM. Every request of a scenario goes through
``VllmEngine.generate`` at once. Prints one line ``RESULT {json}``: generated tokens/s per
scenario and request 0's tokens.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from nolaserve.benchmarks.compare import make_adapter
from nolaserve.server.build_vllm import build_vllm_engine
from nolaserve.server.config import Config
from nolaserve.server.engine.sequence import SamplingParams


async def run(engine, prompts, picks: list[int], max_tokens: int) -> tuple[float, list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(prompt: list[int], pick: int) -> list[int]:
        tokens: list[int] = []
        async for out in engine.generate(prompt, params, f"nola-{pick}" if pick >= 0 else None):
            tokens += out.token_ids
        return tokens

    start = time.perf_counter()
    outs = await asyncio.gather(*(one(p, i) for p, i in zip(prompts, picks)))
    return sum(map(len, outs)) / (time.perf_counter() - start), outs[0]


async def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    config = Config(engine="vllm", model=job["model"], dtype="float32", device="cpu",
                    registry_path=":memory:", max_rank=8, max_loras=job["max_loras"],
                    max_cpu_loras=job["max_cpu_loras"], max_num_seqs=len(job["prompts"]),
                    max_model_len=256, enforce_eager=True, max_lora_rank=8)
    engine = await build_vllm_engine(config)
    try:
        for i in range(job["num_adapters"]):
            engine.store.register(f"nola-{i}", make_adapter(engine.spec, i).to_bytes())
        prompts = job["prompts"]
        await run(engine, prompts[:8], [-1] * 8, 4)  # warm-up
        results, first = {}, {}
        for name, picks in job["scenarios"].items():
            await run(engine, prompts, picks, 1)  # materialize and load outside the timing
            results[name], first[name] = await run(engine, prompts, picks, job["max_tokens"])
        print("RESULT " + json.dumps({"tok_s": results, "first": first}), flush=True)
    finally:
        engine.close()


if __name__ == "__main__":
    asyncio.run(main())
