"""``nolaserve bench``: an open-loop gRPC load generator against a running server.

    nolaserve bench --register 64 --sweep-n 1 8 64 --rate 4 --alpha 0.3 --out n.json
    nolaserve bench --adapter-prefix nola- --num-adapters 100 --sweep-rate 1 2 4 --out r.json
    nolaserve bench --adapters a b c d --spread uniform --batch 8 --num-requests 64

Each run sends its trace (``bench_load``) at the arrival times whatever the server's state,
one streaming request each, and reports throughput, TTFT/TPOT quantiles, SLO attainment
and errors by code. ``--out`` writes one JSON record per run, plus PNG plots against n and
rate when they are swept (``bench_report``). Without an adapter option the requests go to
the base model. Torch is imported only by ``--register``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from . import bench_load as load
from . import bench_report
from .cli_adapters import UsageError, connection
from .client import AsyncClient, NolaserveError

DEFAULT_DEADLINE_S = 600.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench`` flags (the connection flags come from the parent parser)."""
    a = p.add_argument_group("adapters (default: the base model)")
    a.add_argument("--adapters", nargs="+", metavar="ID",
                   help="registered adapter ids (default: the base model)")
    a.add_argument("--adapter-prefix", metavar="PREFIX",
                   help="ids PREFIX0 .. PREFIX{N-1}; with --register, the new ids' prefix")
    a.add_argument("--num-adapters", type=int, metavar="N", help="adapters in a run "
                   "(default: all given); needed with --adapter-prefix alone")
    a.add_argument("--register", type=int, metavar="N",
                   help="register N random NOLA adapters first (replacing same ids)")
    a.add_argument("--rank", type=int, default=8, help="--register: NOLA rank")
    a.add_argument("--num-basis", type=int, default=256, help="--register: NOLA basis size")
    t = p.add_argument_group("trace")
    t.add_argument("--rate", type=float, default=1.0, help="requests per second")
    t.add_argument("--alpha", type=float, default=1.0,
                   help="power-law adapter skew (S-LoRA: 0.1, 0.3, 1; smaller = more skewed)")
    t.add_argument("--cv", type=float, default=1.0, help="inter-arrival coefficient of "
                                                         "variation (1 = Poisson)")
    t.add_argument("--spread", choices=load.SPREADS,
                   help="punica batch spread instead of the power law")
    t.add_argument("--batch", type=int, default=8, help="--spread: requests per group")
    t.add_argument("--num-requests", type=_positive, metavar="N",
                   help="default: rate x duration")
    t.add_argument("--duration", type=float, default=10.0, metavar="S",
                   help="seconds of arrivals (with --rate)")
    t.add_argument("--input-len", type=int, nargs=2, default=[8, 64], metavar=("LO", "HI"),
                   help="prompt tokens, uniform in [LO, HI]")
    t.add_argument("--output-len", type=int, nargs=2, default=[8, 64], metavar=("LO", "HI"),
                   help="generated tokens, uniform in [LO, HI] (EOS ignored)")
    t.add_argument("--seed", type=int, default=0, help="trace seed")
    t.add_argument("--sweep-n", type=int, nargs="+", metavar="N", help="one run per n")
    t.add_argument("--sweep-rate", type=float, nargs="+", metavar="R", help="one run per rate")
    o = p.add_argument_group("report")
    o.add_argument("--slo-ttft", type=float, default=1.0, metavar="S", help="TTFT SLO (s)")
    o.add_argument("--slo-tpot", type=float, default=0.2, metavar="S", help="TPOT SLO (s)")
    o.add_argument("--out", metavar="FILE.json",
                   help="write the records; with a sweep also FILE_vs_n.png / _vs_rate.png")


def command(args: argparse.Namespace, connect: object) -> int:
    """The CLI entry (``connect``, the blocking client factory, is not used; a
    ``UsageError`` exits 2 in ``cli.main``)."""
    return asyncio.run(run(args))


def async_client(args: argparse.Namespace) -> AsyncClient:
    return AsyncClient(args.target, timeout=args.timeout or DEFAULT_DEADLINE_S,
                       **connection(args))


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


async def run(args: argparse.Namespace) -> int:
    """Every run of the sweep; prints the table, writes ``--out`` and the plots."""
    if args.out and not Path(args.out).resolve().parent.is_dir():  # before the run, not after
        raise UsageError(f"--out {args.out}: its folder does not exist")
    async with async_client(args) as client:
        ids = await adapter_ids(client, args)
        ns = args.sweep_n or [args.num_adapters or len(ids)]
        if max(ns) > len(ids):
            raise UsageError(f"n={max(ns)} but only {len(ids)} adapter ids are given")
        records = []
        for n in ns:
            for rate in args.sweep_rate or [args.rate]:
                records.append(await run_one(client, workload(args, n, rate), ids[:n], args))
    print(bench_report.table(records))
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=2) + "\n")
        try:
            for png in bench_report.plots(records, args.out):
                print(f"wrote {png}", file=sys.stderr)
        except ImportError:  # matplotlib is the bench extra's
            print(f"wrote {args.out}; no plots without matplotlib: pip install "
                  "'nolaserve[bench]' (or -e '.[bench]')", file=sys.stderr)
    return 0 if any(r["stats"]["ok"] for r in records) else 1


def workload(args: argparse.Namespace, n: int, rate: float) -> load.Workload:
    count = args.num_requests or max(1, int(rate * args.duration))
    try:
        return load.Workload(
            num_adapters=n, rate=rate, num_requests=count, alpha=args.alpha, cv=args.cv,
            input_range=tuple(args.input_len), output_range=tuple(args.output_len),
            spread=args.spread, batch=args.batch, seed=args.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None


async def adapter_ids(client: AsyncClient, args: argparse.Namespace) -> list[str]:
    """The pool of adapter ids the runs draw from (``[""]``: the base model)."""
    if args.register:
        return await register_nola(client, args.register, args.adapter_prefix or "bench-",
                                   args.rank, args.num_basis)
    if args.adapters:
        return list(args.adapters)
    if args.adapter_prefix:
        if not args.num_adapters:
            raise UsageError("--adapter-prefix needs --num-adapters or --register")
        return [f"{args.adapter_prefix}{i}" for i in range(max(args.num_adapters,
                                                               *(args.sweep_n or [0])))]
    if args.num_adapters not in (None, 1) or (args.sweep_n and args.sweep_n != [1]):
        raise UsageError("n > 1 needs --adapters, --adapter-prefix or --register")
    return [""]


async def register_nola(client: AsyncClient, count: int, prefix: str, rank: int,
                        num_basis: int) -> list[str]:
    """Register ``count`` random NOLA adapters shaped like the server's model."""
    from nolaserve.adapters.nola import random_nola
    from nolaserve.adapters.spec import BaseModelSpec

    info = await client.server_info()
    shapes = {m.name: (m.in_features, m.out_features) for m in info.target_modules}
    spec = BaseModelSpec(info.num_layers, shapes, max_rank=info.max_rank, name=info.base_model)
    ids = [f"{prefix}{i}" for i in range(count)]
    start = time.perf_counter()
    for i, adapter_id in enumerate(ids):
        data = random_nola(spec, seed=i, rank=min(rank, info.max_rank),
                           num_basis=num_basis).to_bytes()
        await client.register_adapter(adapter_id, data, replace=True)
    print(f"registered {count} NOLA adapters {ids[0]} .. {ids[-1]} in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return ids


async def run_one(client: AsyncClient, w: load.Workload, ids: list[str],
                  args: argparse.Namespace) -> dict[str, object]:
    """Send one trace open-loop and return its record (params + stats)."""
    trace = load.make_trace(w)
    print(f"run: n={w.num_adapters} rate={w.rate:g}/s {len(trace)} requests over "
          f"{trace[-1].arrival:.1f} s ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    results = await send_trace(client, trace, ids, start)
    stats = load.summarize(results, args.slo_ttft, args.slo_tpot, start)
    params = asdict(w) | {"target": args.target, "slo_ttft_s": args.slo_ttft,
                          "slo_tpot_s": args.slo_tpot, "adapter_ids": ids[:8]}
    return {"params": params, "stats": stats}


async def send_trace(client: AsyncClient, trace: list[load.TraceRequest], ids: list[str],
                     start: float) -> list[load.RequestResult]:
    """Fire each request at its arrival time after ``start`` (open loop), then wait for
    all of them."""
    tasks = []
    for req in trace:
        delay = start + req.arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one_request(client, req, ids[req.adapter])))
    return list(await asyncio.gather(*tasks))


async def one_request(client: AsyncClient, req: load.TraceRequest, adapter_id: str
                      ) -> load.RequestResult:
    """Stream one request; one token time per generated token."""
    result = load.RequestResult(sent=time.perf_counter(), token_times=[], done=0.0)
    try:
        async for chunk in client.generate_stream(
                load.dummy_prompt(req.input_len), adapter_id=adapter_id,
                max_tokens=req.output_len, ignore_eos=True):
            now = time.perf_counter()
            result.token_times += [now] * len(chunk.token_ids)
    except NolaserveError as e:
        result.error = e.code
    result.done = time.perf_counter()
    return result
