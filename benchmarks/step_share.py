"""Does the front end starve the step thread? One engine over a tiny Llama (SmolLM2's
tokenizer, so detokenization costs what it costs on the real model; ``--smollm2`` for the
real model), stepped alone and
then behind the HTTP server with ``--streams`` concurrent streams from another process:
per step, the time in ``Engine.step``, the part of it spent detokenizing, and how long
the step thread waits between steps (the GIL held by the event loop, and the inbox).

    python -m nolaserve.benchmarks.step_share --streams 64 --tokens 64 [--stream-intervals 1 8]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time

from nolaserve.server.build import build_engine
from nolaserve.server.config import Config
from nolaserve.server.engine import detokenizer
from nolaserve.server.engine.sequence import SamplingParams

CLIENT = """import asyncio, sys, httpx
url, n, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
async def one(c, i):
    body = {"model": "", "prompt": f"request {i}: tell me a story", "max_tokens": tokens,
            "stream": True, "ignore_eos": True, "temperature": 0}
    async with c.stream("POST", "/completions", json=body) as r:
        async for _ in r.aiter_lines():
            pass
async def main():
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        await asyncio.gather(*(one(c, i) for i in range(n)))
asyncio.run(main())
"""


class Probe:
    """Times ``engine.step`` and the detokenizer's calls inside it."""

    def __init__(self, engine) -> None:
        self.steps, self.step_s, self.detok_s, self.gap_s = 0, 0.0, 0.0, 0.0
        self._last_end: float | None = None
        step = engine.step

        def timed_step():
            start = time.perf_counter()
            if self._last_end is not None:
                self.gap_s += start - self._last_end
            try:
                return step()
            finally:
                self._last_end = time.perf_counter()
                self.steps += 1
                self.step_s += self._last_end - start

        engine.step = timed_step
        cls = detokenizer.IncrementalDetokenizer
        self._originals = {name: getattr(cls, name) for name in ("add", "flush")}
        for name, fn in self._originals.items():
            setattr(cls, name, self._timed(fn))

    def close(self) -> None:
        """Put the detokenizer's methods back."""
        for name, fn in self._originals.items():
            setattr(detokenizer.IncrementalDetokenizer, name, fn)

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.detok_s += time.perf_counter() - start
        return wrapper

    def row(self, name: str) -> str:
        n = max(1, self.steps)
        return (f"| {name} | {self.steps} | {self.step_s / n * 1e3:.2f} | "
                f"{self.detok_s / n * 1e3:.2f} ({self.detok_s / max(self.step_s, 1e-9):.0%}) "
                f"| {self.gap_s / n * 1e3:.2f} |")


def make_engine(streams: int, real: bool, stream_interval: int = 1):
    """An engine over a tiny Llama with SmolLM2's tokenizer, or over SmolLM2 (``real``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from nolaserve.server.engine import model_loader as ml

    model, tokenizer = ml.load_model(device="cpu", dtype="float32")
    if not real:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    with socket.socket() as s:  # http_port 0 means no HTTP API: pick a free port
        s.bind(("127.0.0.1", 0))
        http_port = s.getsockname()[1]
    config = Config(device="cpu", dtype="float32", registry_path=":memory:", port=0,
                    metrics_port=0, http_port=http_port, max_num_seqs=streams,
                    host="127.0.0.1", stream_interval=stream_interval)
    return build_engine(config, model=model, tokenizer=tokenizer), config


def run_all(engine, streams: int, tokens: int, tag: str) -> None:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    for i in range(streams):
        prompt = engine.tokenizer.encode(f"request {i}: tell me a story")
        engine.add_request(f"{tag}{i}", prompt, params)
    while engine.has_unfinished():
        engine.step()


def offline(streams: int, tokens: int, real: bool) -> Probe:
    engine, _ = make_engine(streams, real)
    run_all(engine, streams, 4, "warm")
    probe = Probe(engine)
    try:
        run_all(engine, streams, tokens, "r")
    finally:
        probe.close()
        engine.close()
    return probe


async def over_http(streams: int, tokens: int, real: bool, stream_interval: int
                    ) -> tuple[Probe, float]:
    """The probe of the HTTP run, and its output tokens per second as the client waits."""
    from nolaserve.server.app import start

    engine, config = make_engine(streams, real, stream_interval)
    run_all(engine, streams, 4, "warm")
    running = await start(config, engine)
    probe = Probe(engine)
    try:
        start_s = time.perf_counter()
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, running.http_url, str(streams), str(tokens))
        await client.wait()
        rate = streams * tokens / (time.perf_counter() - start_s)
    finally:
        probe.close()
        await running.stop()
    if client.returncode:
        raise subprocess.CalledProcessError(client.returncode, "client")
    return probe, rate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--smollm2", action="store_true", help="the real model, not a tiny one")
    p.add_argument("--stream-intervals", type=int, nargs="+", default=[1], metavar="N",
                   help="the server's stream_interval of each HTTP run, side by side")
    args = p.parse_args(argv)
    alone = offline(args.streams, args.tokens, args.smollm2)
    runs = [(n, *asyncio.run(over_http(args.streams, args.tokens, args.smollm2, n)))
            for n in args.stream_intervals]
    model = "SmolLM2-135M" if args.smollm2 else "tiny Llama, SmolLM2 tokenizer"
    print(f"{args.streams} streams x {args.tokens} tokens, {model}, fp32 CPU")
    print("| run | steps | ms per step | of which detokenizing | ms between steps | "
          "client tok/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(alone.row("engine alone") + " - |")
    for n, probe, rate in runs:
        print(probe.row(f"behind HTTP, {args.streams} streams, stream_interval {n}")
              + f" {rate:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
