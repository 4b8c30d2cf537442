"""Registry backends side by side: registration latency, and listing at 100,000 adapters.

    python -m nolaserve.benchmarks.registry --postgres postgresql://user@host:port/db \
        [--registers 300] [--adapters 100000]

For SQLite (a file in a temporary directory) and PostgreSQL (a fresh schema, dropped
after), in one run: the p50/p99 latency of ``Registry.register`` with a real NOLA file
(SmolLM2-135M q_proj + v_proj, r=8, k=l=256: 123 KB), which is what RegisterAdapter
commits once the file is validated; then the registry is filled to ``--adapters``
adapters (1 KB each: listing never reads the bytes) and the p50/p99 of one ListAdapters
page (100 records, first page and a page in the middle) and of ``count`` are measured.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import quote

from nolaserve.adapters.nola import random_nola
from nolaserve.adapters.registry import Registry, open_registry
from nolaserve.adapters.registry_rows import NewAdapter, encode_token

from .adapters import SMOLLM2


def percentiles(fn: Callable[[int], object], n: int) -> tuple[float, float]:
    """p50 and p99 of ``fn(i)`` over ``n`` calls, in milliseconds."""
    times = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return statistics.median(times), times[min(n - 1, round(0.99 * (n - 1)))]


def fill(registry: Registry, total: int, batch: int = 1000) -> None:
    have = registry.count()
    for start in range(have, total, batch):
        registry.register_many([NewAdapter(f"fill-{i:07d}", "lora", os.urandom(1024))
                                for i in range(start, min(total, start + batch))])


def measure(registry: Registry, registers: int, adapters: int) -> dict[str, tuple]:
    data = [random_nola(SMOLLM2, seed=s, rank=8, num_basis=256).to_bytes()
            for s in range(4)]
    out = {"register": percentiles(
        lambda i: registry.register(f"bench-{i:05d}", "nola", data[i % 4]), registers)}
    fill(registry, adapters)
    middle = encode_token(f"fill-{adapters // 2:07d}")
    out["list first page"] = percentiles(lambda i: registry.list(100), 50)
    out["list middle page"] = percentiles(lambda i: registry.list(100, middle), 50)
    out["count"] = percentiles(lambda i: registry.count(), 20)
    out["adapters"] = (registry.count(),)
    return out


@contextlib.contextmanager
def postgres_schema(url: str) -> Iterator[str]:
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        sep = "&" if "?" in url else "?"
        yield f"{url}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", required=True, help="postgresql:// URL (a schema is "
                                                          "created in it and dropped)")
    parser.add_argument("--registers", type=int, default=300)
    parser.add_argument("--adapters", type=int, default=100_000)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp, open_registry(f"sqlite://{tmp}/r.db") as r:
        results["SQLite"] = measure(r, args.registers, args.adapters)
    with postgres_schema(args.postgres) as url, open_registry(url) as r:
        results["PostgreSQL"] = measure(r, args.registers, args.adapters)
    print("| operation | SQLite p50 / p99 (ms) | PostgreSQL p50 / p99 (ms) |")
    print("| --- | --- | --- |")
    for op in ("register", "list first page", "list middle page", "count"):
        cells = [f"{results[b][op][0]:.2f} / {results[b][op][1]:.2f}"
                 for b in ("SQLite", "PostgreSQL")]
        print(f"| {op} | {cells[0]} | {cells[1]} |")
    print(f"adapters registered: SQLite {results['SQLite']['adapters'][0]}, "
          f"PostgreSQL {results['PostgreSQL']['adapters'][0]}")


if __name__ == "__main__":
    main()
