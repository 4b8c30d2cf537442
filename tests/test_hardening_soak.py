"""Churn soak and adapter isolation over a real gRPC channel: many adapters rotate through
four device slots under concurrent generate, stream-and-cancel, register, replace, delete
and pin traffic. Afterwards nothing leaks (requests, KV blocks, slot references, memory)
and every answer equals the same request run alone, on the adapter it named.

The soak's size is a pytest option: ``--soak-adapters`` (CI 200; the issue's long form is
1000) and ``--soak-seconds`` (CI 6). It runs at least that long and until every kind of
operation reached its target count (``targets``): no assertion depends on the machine's
speed."""

import asyncio
import random
import time
import zlib

import grpc
import pytest
from conftest import tiny_llama
from engine_helpers import greedy, make_engine, run
from server_helpers import (
    HANG_GUARD,
    assert_no_leaks,
    expect_code,
    request,
    serving,
    slow_down,
    wait_idle,
)

from nolaserve.adapters.nola import random_nola
from nolaserve.v1 import admin_pb2

Code = grpc.StatusCode
PROMPTS = ["héllo wörld", "naïve café 😀", "中文字 こんにちは", "🎉 wörld"]
MAX_TOKENS = 4
NUM_SLOTS = 4
CHURN_IDS = [f"churn-{i}" for i in range(6)]
# VmRSS may grow by a fixed allowance (allocator and caches settling) plus a little per
# RPC, so the bound scales with the soak's length; the measured growth is a few MiB.
RSS_BASE, RSS_PER_RPC = 32 << 20, 4 << 10
# The code a request gets when a delete of its adapter overlapped it (or the adapter was not
# registered when it started): the deletion contract says NOT_FOUND if deleted before
# admission; once admitted it completes (docs/operations.md).
DELETED = {Code.NOT_FOUND}


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=300)


def nola(spec, seed: int) -> bytes:
    return random_nola(spec, seed=seed, rank=4, num_basis=16).to_bytes()


def vm_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class References:
    """Greedy outputs of one request run alone on a fresh engine, per (adapter seed, prompt);
    seed None is the base model."""

    def __init__(self, model, tokenizer) -> None:
        self.engine = make_engine(model, tokenizer, num_slots=NUM_SLOTS)
        self.tokenizer = tokenizer
        self.cache: dict[tuple[int | None, str], list[int]] = {}

    def __call__(self, seed: int | None, prompt: str) -> list[int]:
        if (seed, prompt) not in self.cache:
            adapter = None if seed is None else f"ref-{seed}"
            if adapter and adapter not in self.engine.store.registry:
                self.engine.store.register(adapter, nola(self.engine.store.spec, seed))
            ids = self.tokenizer(prompt)["input_ids"]
            self.cache[seed, prompt] = run(self.engine, {"r": (ids, greedy(MAX_TOKENS),
                                                               adapter)})["r"]
        return self.cache[seed, prompt]


class Churn:
    """The mutable adapters: their version history (seeds), which version is acked, which
    are surely registered, and how many deletes of each have begun. One task mutates them,
    so these are exact between its awaits."""

    def __init__(self) -> None:
        self.history: dict[str, list[int]] = {i: [] for i in CHURN_IDS}
        self.acked: dict[str, int] = {}  # id -> index of the last acknowledged version
        self.present: set[str] = set()  # acked registered, and no delete begun since
        self.deletes: dict[str, int] = dict.fromkeys(CHURN_IDS, 0)  # deletes begun

    def window(self, adapter: str) -> tuple[bool, int]:
        """What a call starting now must remember: surely registered, deletes begun."""
        return adapter in self.present, self.deletes[adapter]

    def check_failure(self, adapter: str, start: tuple[bool, int], error) -> None:
        """A failed call on ``adapter`` is allowed only as a deletion code, and only if the
        adapter was not surely registered at its start or a delete began during it."""
        was_present, deletes = start
        overlapped = not was_present or self.deletes[adapter] != deletes
        assert error.code() in DELETED and overlapped, (adapter, error.code(), error.details(),
                                                        was_present, overlapped)


# The soak runs at least --soak-seconds and until every one of these has happened, so a
# slow machine makes it longer, never vacuous.
def targets(num_adapters: int) -> dict[str, int]:
    return dict(generate=min(num_adapters, 100), stream=10, register=3, replace=3, delete=3, pin=3,
                churned=10, replaced_read=3)


async def soak(c, engine, stable: dict[str, int], seconds: float, rng: random.Random,
               churn: Churn, answers: list, pinned: set[str]) -> dict[str, int]:
    spec = engine.store.spec
    deadline = time.monotonic() + seconds
    want = targets(len(stable))
    counts = dict.fromkeys(want, 0)
    order = list(stable)
    rng.shuffle(order)
    turn = iter(range(10**9))

    def going() -> bool:
        if time.monotonic() < deadline or any(counts[k] < n for k, n in want.items()):
            assert time.monotonic() < deadline + HANG_GUARD, f"soak stuck at {counts}"
            return True
        return False

    def prompt_of(adapter: str) -> str:
        return PROMPTS[zlib.crc32(adapter.encode()) % len(PROMPTS)]

    async def generator() -> None:
        while going():
            adapter = order[next(turn) % len(order)]
            prompt = prompt_of(adapter)
            out = await c.inference.Generate(request(prompt, MAX_TOKENS, adapter),
                                             timeout=HANG_GUARD)
            answers.append(("stable", adapter, prompt, list(out.token_ids), None))
            counts["generate"] += 1

    async def churn_reader() -> None:
        while going():
            adapter = rng.choice(CHURN_IDS)
            prompt = prompt_of(adapter)
            lo, start = churn.acked.get(adapter), churn.window(adapter)
            try:
                out = await c.inference.Generate(request(prompt, MAX_TOKENS, adapter),
                                                 timeout=HANG_GUARD)
            except grpc.aio.AioRpcError as e:
                churn.check_failure(adapter, start, e)
                continue
            hi = len(churn.history[adapter]) - 1
            lo = 0 if lo is None else lo
            seeds = churn.history[adapter][lo:hi + 1]
            answers.append(("churn", adapter, prompt, list(out.token_ids), seeds))
            counts["churned"] += 1
            counts["replaced_read"] += len(churn.history[adapter][:hi + 1]) >= 2
            await asyncio.sleep(0)

    async def stream_and_cancel() -> None:
        while going():
            adapter = rng.choice(order[:50] + CHURN_IDS)
            start = churn.window(adapter) if adapter in churn.deletes else None
            stream = c.inference.GenerateStream(request(prompt_of(adapter), 60, adapter),
                                                timeout=rng.choice([0.05, 0.3, HANG_GUARD]))
            try:
                for _ in range(rng.randint(0, 3)):
                    await stream.read()
            except grpc.aio.AioRpcError as e:
                if e.code() != Code.DEADLINE_EXCEEDED:
                    assert start is not None, (adapter, e.code(), e.details())
                    churn.check_failure(adapter, start, e)
            stream.cancel()
            counts["stream"] += 1

    async def admin() -> None:
        seed = 10_000
        while going():
            adapter = rng.choice(CHURN_IDS)
            op = rng.choice(["replace", "delete"]) if adapter in churn.present else "register"
            if op == "delete":
                churn.present.discard(adapter)
                churn.deletes[adapter] += 1
                await c.admin.DeleteAdapter(admin_pb2.AdapterRef(adapter_id=adapter))
            else:
                seed += 1
                churn.history[adapter].append(seed)
                await c.admin.RegisterAdapter(admin_pb2.RegisterAdapterRequest(
                    adapter_id=adapter, data=nola(spec, seed), replace=op == "replace"))
                churn.acked[adapter] = len(churn.history[adapter]) - 1
                churn.present.add(adapter)
            counts[op] += 1
            await asyncio.sleep(0.02)  # pacing: readers get to see each version

    async def pinner() -> None:
        while going():
            adapter = rng.choice(order)
            if len(pinned) < NUM_SLOTS - 2:
                try:
                    await c.admin.PinAdapter(admin_pb2.AdapterRef(adapter_id=adapter))
                    pinned.add(adapter)
                    counts["pin"] += 1
                except grpc.aio.AioRpcError as e:  # every slot busy right now
                    assert e.code() == Code.RESOURCE_EXHAUSTED, e.details()
            else:
                victim = rng.choice(sorted(pinned))
                await c.admin.UnpinAdapter(admin_pb2.AdapterRef(adapter_id=victim))
                pinned.discard(victim)
            await asyncio.sleep(0.1)  # pacing

    tasks = [generator() for _ in range(4)] + [churn_reader() for _ in range(2)] + \
        [stream_and_cancel() for _ in range(2)] + [admin(), pinner()]
    await asyncio.gather(*tasks)
    for adapter in sorted(pinned):
        await c.admin.UnpinAdapter(admin_pb2.AdapterRef(adapter_id=adapter))
    return counts


def test_churn_soak_leaks_nothing_and_matches_requests_run_alone(model, bytebpe, soak_size):
    num_adapters, seconds = soak_size
    engine = make_engine(model, bytebpe, num_slots=NUM_SLOTS, max_num_seqs=16)
    spec = engine.store.spec
    stable = {f"stable-{i:04d}": 1 + i for i in range(num_adapters)}
    for adapter, seed in stable.items():
        engine.store.register(adapter, nola(spec, seed))
    rng = random.Random(0)
    churn, answers, pinned = Churn(), [], set()

    async def main():
        async with serving(engine) as c:
            for adapter in list(stable)[:8]:  # warm up allocator and caches before measuring
                await c.inference.Generate(request("héllo", MAX_TOKENS, adapter))
            rss0 = vm_rss()
            counts = await soak(c, engine, stable, seconds, rng, churn, answers, pinned)
            await wait_idle(engine)
            rpcs = int(sum(s.value for family in c.running.metrics.requests.collect()
                       for s in family.samples if s.name.endswith("_total")))
            return counts, vm_rss() - rss0, rpcs

    counts, growth, rpcs = asyncio.run(main())
    assert_no_leaks(engine)
    assert engine.store.slots.table.pinned == 0
    limit = RSS_BASE + RSS_PER_RPC * rpcs
    assert growth < limit, f"VmRSS grew by {growth >> 20} MiB over {rpcs} RPCs"
    want = targets(num_adapters)
    assert all(counts[k] >= n for k, n in want.items()), counts
    rotated = {a for kind, a, *_ in answers if kind == "stable"}
    assert len(rotated) >= min(num_adapters, 100), "too few adapters rotated through"

    started = time.perf_counter()
    ref = References(model, bytebpe)
    for kind, adapter, prompt, tokens, seeds in answers:
        if kind == "stable":
            assert tokens == ref(stable[adapter], prompt), (adapter, prompt)
        else:  # one of the versions live while it ran, never another adapter's weights
            assert any(tokens == ref(s, prompt) for s in seeds), (adapter, seeds)
    print(f"soak {counts}, {len(answers)} answers, {len(ref.cache)} references in "
          f"{time.perf_counter() - started:.1f} s, VmRSS growth {growth >> 20} MiB "
          f"over {rpcs} RPCs (limit {limit >> 20} MiB)")
    sample = [(a, p) for kind, a, p, *_ in answers if kind == "stable"][:40]
    outputs = {tuple(ref(stable[a], p)) for a, p in sample}
    assert len(outputs) > len(sample) // 2, "adapters too alike to tell apart"


def test_replace_and_delete_mid_flight_never_mix_adapters(model, bytebpe):
    """X is replaced by X' and Y deleted while requests for both are decoding: in-flight
    ones finish on the weights they started with, later ones see X' and NOT_FOUND."""
    engine = make_engine(model, bytebpe, num_slots=NUM_SLOTS)
    spec = engine.store.spec
    engine.store.register("x", nola(spec, 11))
    engine.store.register("y", nola(spec, 12))
    slow_down(engine, 0.01)
    prompt, long = PROMPTS[0], 24

    async def stream_rest(stream, first) -> list[int]:
        tokens = list(first.token_ids)
        while (m := await stream.read()) is not grpc.aio.EOF:
            tokens += m.token_ids
        return tokens

    async def main():
        async with serving(engine) as c:
            streams = [c.inference.GenerateStream(request(prompt, long, a))
                       for a in ["x", "x", "y", "x", "y", ""]]
            firsts = [await s.read() for s in streams]  # all hold their slot now
            rest = [asyncio.create_task(stream_rest(s, f)) for s, f in zip(streams, firsts)]
            await c.admin.RegisterAdapter(admin_pb2.RegisterAdapterRequest(
                adapter_id="x", data=nola(spec, 13), replace=True))
            await c.admin.DeleteAdapter(admin_pb2.AdapterRef(adapter_id="y"))
            after = await asyncio.gather(*[c.inference.Generate(request(prompt, long, "x"))
                                           for _ in range(3)])
            await expect_code(Code.NOT_FOUND, c.inference.Generate(request(prompt, 4, "y")))
            return await asyncio.gather(*rest), [list(a.token_ids) for a in after]

    in_flight, after = asyncio.run(main())
    ref_engine = make_engine(model, bytebpe)
    ids = bytebpe(prompt)["input_ids"]
    want = {}
    for name, seed in [("x", 11), ("x2", 13), ("y", 12), ("", None)]:
        if seed is not None:
            ref_engine.store.register(name, nola(spec, seed))
        want[name] = run(ref_engine, {"r": (ids, greedy(long), name or None)})["r"]
    assert len({tuple(v) for v in want.values()}) == 4  # the four weights are told apart
    assert in_flight == [want["x"], want["x"], want["y"], want["x"], want["y"], want[""]]
    assert after == [want["x2"]] * 3
    assert_no_leaks(engine)
