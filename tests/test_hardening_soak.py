"""Churn soak and adapter isolation over a real gRPC channel: many adapters rotate through
four device slots under concurrent generate, stream-and-cancel, register, replace, delete
and pin traffic. Afterwards nothing leaks (requests, KV blocks, slot references, memory)
and every answer equals the same request run alone, on the adapter it named.

The soak's size is a pytest option: ``--soak-adapters`` (CI 200; the issue's long form is
1000) and ``--soak-seconds`` (CI 6)."""

import asyncio
import random
import time
import zlib

import grpc
import pytest
from conftest import tiny_llama
from engine_helpers import greedy, make_engine, run
from server_helpers import assert_no_leaks, expect_code, request, serving, slow_down, wait_idle

from nolaserve.adapters.nola import random_nola
from nolaserve.v1 import admin_pb2

Code = grpc.StatusCode
PROMPTS = ["héllo wörld", "naïve café 😀", "中文字 こんにちは", "🎉 wörld"]
MAX_TOKENS = 4
NUM_SLOTS = 4
CHURN_IDS = [f"churn-{i}" for i in range(6)]
RSS_GROWTH_LIMIT = 256 << 20  # bytes of VmRSS growth allowed over the soak


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
    """The mutable adapters: their version history (seeds) and which version is acked.
    One task mutates them, so ``present`` is exact between its awaits."""

    def __init__(self) -> None:
        self.history: dict[str, list[int]] = {i: [] for i in CHURN_IDS}
        self.acked: dict[str, int] = {}  # id -> index of the last acknowledged version
        self.present: set[str] = set()


async def soak(c, engine, stable: dict[str, int], seconds: float, rng: random.Random,
               churn: Churn, answers: list, pinned: set[str]) -> dict[str, int]:
    spec = engine.store.spec
    deadline = time.monotonic() + seconds
    counts = dict(generate=0, stream=0, register=0, replace=0, delete=0, pin=0, churned=0)
    order = list(stable)
    rng.shuffle(order)
    turn = iter(range(10**9))

    def prompt_of(adapter: str) -> str:
        return PROMPTS[zlib.crc32(adapter.encode()) % len(PROMPTS)]

    async def generator() -> None:
        while time.monotonic() < deadline:
            adapter = order[next(turn) % len(order)]
            prompt = prompt_of(adapter)
            out = await c.inference.Generate(request(prompt, MAX_TOKENS, adapter), timeout=60)
            answers.append(("stable", adapter, prompt, list(out.token_ids), None))
            counts["generate"] += 1

    async def churn_reader() -> None:
        while time.monotonic() < deadline:
            adapter = rng.choice(CHURN_IDS)
            prompt = prompt_of(adapter)
            lo = churn.acked.get(adapter)
            try:
                out = await c.inference.Generate(request(prompt, MAX_TOKENS, adapter),
                                                 timeout=60)
            except grpc.aio.AioRpcError as e:  # deleted (or never there) meanwhile
                assert e.code() in (Code.NOT_FOUND, Code.FAILED_PRECONDITION), e.details()
                continue
            hi = len(churn.history[adapter]) - 1
            lo = 0 if lo is None else lo
            answers.append(("churn", adapter, prompt, list(out.token_ids),
                            churn.history[adapter][lo:hi + 1]))
            counts["churned"] += 1
            await asyncio.sleep(0)

    async def stream_and_cancel() -> None:
        while time.monotonic() < deadline:
            adapter = rng.choice(order[:50] + CHURN_IDS)
            stream = c.inference.GenerateStream(request(prompt_of(adapter), 60, adapter),
                                                timeout=rng.choice([0.05, 0.3, 60]))
            try:
                for _ in range(rng.randint(0, 3)):
                    await stream.read()
            except grpc.aio.AioRpcError as e:
                assert e.code() in (Code.NOT_FOUND, Code.FAILED_PRECONDITION,
                                    Code.DEADLINE_EXCEEDED), e.details()
            stream.cancel()
            counts["stream"] += 1

    async def admin() -> None:
        seed = 10_000
        while time.monotonic() < deadline:
            adapter = rng.choice(CHURN_IDS)
            op = rng.choice(["replace", "delete"]) if adapter in churn.present else "register"
            if op == "delete":
                churn.present.discard(adapter)
                await c.admin.DeleteAdapter(admin_pb2.AdapterRef(adapter_id=adapter))
            else:
                seed += 1
                churn.history[adapter].append(seed)
                await c.admin.RegisterAdapter(admin_pb2.RegisterAdapterRequest(
                    adapter_id=adapter, data=nola(spec, seed), replace=op == "replace"))
                churn.acked[adapter] = len(churn.history[adapter]) - 1
                churn.present.add(adapter)
            counts[op] += 1
            await asyncio.sleep(0.02)

    async def pinner() -> None:
        while time.monotonic() < deadline:
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
            await asyncio.sleep(0.1)

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
            await wait_idle(engine, timeout=30)
            return counts, vm_rss() - rss0

    counts, growth = asyncio.run(main())
    assert_no_leaks(engine)
    assert engine.store.slots.table.pinned == 0
    assert growth < RSS_GROWTH_LIMIT, f"VmRSS grew by {growth >> 20} MiB"
    assert counts["generate"] >= min(num_adapters, 100) and counts["replace"] >= 3, counts
    assert counts["stream"] >= 10 and counts["delete"] >= 3 and counts["pin"] >= 3, counts
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
          f"{time.perf_counter() - started:.1f} s, VmRSS growth {growth >> 20} MiB")
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
