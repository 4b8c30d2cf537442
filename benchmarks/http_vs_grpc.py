"""HTTP (the OpenAI API, driven by the official ``openai`` client) against gRPC (the
``AsyncClient``), on one server, with the same open-loop trace, in one run: output tok/s
and TTFT/TPOT per protocol, rounds alternating between the two.

    python -m nolaserve.benchmarks.http_vs_grpc               # spawns `nolaserve serve`
    python -m nolaserve.benchmarks.http_vs_grpc --target 127.0.0.1:50051 \
        --url http://127.0.0.1:8000/v1

Every request streams (``stream_options.include_usage`` over HTTP), ignores EOS and uses
one of ``--num-adapters`` random NOLA adapters (power-law trace, ``bench_load``). Spawning
a server needs torch only to build the adapters; the server runs in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import threading
import time

from nolaserve.clients import bench_load as load
from nolaserve.clients.bench_cli import register_nola
from nolaserve.clients.client import AsyncClient, NolaserveError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", help="gRPC address of a running server (else one is spawned)")
    p.add_argument("--url", help="its OpenAI API base URL (with --target)")
    p.add_argument("--model", default="", help="spawned server: model (default SmolLM2)")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--rate", type=float, default=4.0, help="requests per second")
    p.add_argument("--num-adapters", type=int, default=4)
    p.add_argument("--input-len", type=int, nargs=2, default=(16, 64), metavar=("LO", "HI"))
    p.add_argument("--output-len", type=int, nargs=2, default=(32, 64), metavar=("LO", "HI"))
    p.add_argument("--rounds", type=int, default=2, help="gRPC, HTTP pairs")
    p.add_argument("--out", help="write the records as JSON")
    return p.parse_args(argv)


async def grpc_request(client: AsyncClient, req: load.TraceRequest, adapter: str
                       ) -> load.RequestResult:
    result = load.RequestResult(sent=time.perf_counter(), token_times=[], done=0.0)
    try:
        async for chunk in client.generate_stream(
                load.dummy_prompt(req.input_len), adapter_id=adapter,
                max_tokens=req.output_len, temperature=0.0, ignore_eos=True):
            result.token_times += [time.perf_counter()] * len(chunk.token_ids)
    except NolaserveError as e:
        result.error = e.code
    result.done = time.perf_counter()
    return result


async def http_request(oa, req: load.TraceRequest, adapter: str) -> load.RequestResult:
    import openai

    result = load.RequestResult(sent=time.perf_counter(), token_times=[], done=0.0)
    try:
        stream = await oa.completions.create(
            model=adapter, prompt=load.dummy_prompt(req.input_len), max_tokens=req.output_len,
            temperature=0, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, "return_token_ids": True})
        async for chunk in stream:
            if chunk.choices:
                result.token_times += [time.perf_counter()] * len(chunk.choices[0].token_ids)
    except openai.APIError as e:
        result.error = type(e).__name__
    result.done = time.perf_counter()
    return result


async def send(trace: list[load.TraceRequest], one, ids: list[str]) -> list[load.RequestResult]:
    """Fire each request at its arrival time (open loop), then wait for all of them."""
    start, tasks = time.perf_counter(), []
    for req in trace:
        delay = start + req.arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(req, ids[req.adapter])))
    return list(await asyncio.gather(*tasks))


async def compare(target: str, url: str, args: argparse.Namespace) -> list[dict]:
    import openai

    w = load.Workload(args.num_adapters, args.rate, args.num_requests,
                      input_range=tuple(args.input_len), output_range=tuple(args.output_len))
    trace = load.make_trace(w)
    records = []
    async with AsyncClient(target) as client:
        ids = await register_nola(client, args.num_adapters, "bench-http-", 8, 256)
        oa = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
        await send(trace[:2], lambda r, a: grpc_request(client, r, a), ids)  # warm-up
        for round_ in range(args.rounds):
            for name, one in (("grpc", lambda r, a: grpc_request(client, r, a)),
                              ("http", lambda r, a: http_request(oa, r, a))):
                stats = load.summarize(await send(trace, one, ids), 1e9, 1e9)
                records.append({"protocol": name, "round": round_, "stats": stats})
                print(f"{name} round {round_}: {stats['tok_per_s']:.1f} tok/s, TTFT p50 "
                      f"{stats['ttft_s']['p50'] * 1e3:.0f} ms", file=sys.stderr, flush=True)
    return records


def report(records: list[dict]) -> str:
    rows = ["| protocol | output tok/s (mean of rounds) | TTFT p50 / p90 (ms) | TPOT p50 (ms) "
            "| errors |", "| --- | --- | --- | --- | --- |"]
    for name in ("grpc", "http"):
        mine = [r["stats"] for r in records if r["protocol"] == name]
        tok = sum(s["tok_per_s"] for s in mine) / len(mine)
        ttft50 = sum(s["ttft_s"]["p50"] for s in mine) / len(mine) * 1e3
        ttft90 = sum(s["ttft_s"]["p90"] for s in mine) / len(mine) * 1e3
        tpot = sum(s["tpot_s"]["p50"] for s in mine) / len(mine) * 1e3
        errors = sum(sum(s["errors"].values()) for s in mine)
        rows.append(f"| {name} | {tok:.1f} | {ttft50:.0f} / {ttft90:.0f} | {tpot:.0f} "
                    f"| {errors} |")
    return "\n".join(rows)


def spawn(args: argparse.Namespace) -> tuple[subprocess.Popen, str, str]:
    """`nolaserve serve` on free ports, an in-memory registry; its gRPC address and URL."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        http_port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "nolaserve.clients.cli", "serve", "--port", "0",
           "--http-port", str(http_port), "--metrics-port", "0", "--registry-path", ":memory:"]
    proc = subprocess.Popen(cmd + (["--model", args.model] if args.model else []),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.monotonic() + 900
    while not any("OpenAI API on" in line for line in lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start: {''.join(lines)}")
        time.sleep(0.2)
    text = "".join(lines)
    target = re.search(r"listening on (\S+)", text).group(1)
    return proc, target, re.search(r"OpenAI API on (\S+)", text).group(1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    proc = None
    if args.target:
        target, url = args.target, args.url
    else:
        proc, target, url = spawn(args)
    try:
        records = asyncio.run(compare(target, url, args))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    print(report(records))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "records": records}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
