"""One OpenMP team per process (adapters/cpu_threads.py): the step thread runs torch's CPU
kernels in parallel, every helper thread serially, and the thread that built the engine
is gone. Counts are read from torch on each thread; nothing here is timed."""

import asyncio
import threading

import pytest
import torch
from conftest import tiny_llama
from engine_helpers import make_engine
from server_helpers import HANG_GUARD, serving

from nolaserve.adapters import cpu_threads
from nolaserve.adapters.nola import random_nola
from nolaserve.server import app
from nolaserve.server.config import Config
from nolaserve.server.engine.async_engine import AsyncEngine

pytestmark = pytest.mark.skipif(cpu_threads.PARALLEL_THREADS < 2,
                                reason="one core: every thread is serial anyway")


def on_new_thread(fn):
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join(timeout=HANG_GUARD)
    return out[0]


def test_a_thread_keeps_its_count_when_another_sets_one_before_its_first_op():
    """torch copies the process-wide count into a thread at its first parallel op: a
    helper's ``serial`` in between must not make the step thread serial."""
    parallel_set, helper_done = threading.Event(), threading.Event()

    def step_thread() -> int:
        cpu_threads.parallel()
        parallel_set.set()
        helper_done.wait(HANG_GUARD)
        return torch.get_num_threads()

    def helper() -> None:
        parallel_set.wait(HANG_GUARD)
        cpu_threads.serial()
        helper_done.set()

    other = threading.Thread(target=helper)
    other.start()
    assert on_new_thread(step_thread) == cpu_threads.PARALLEL_THREADS
    other.join(timeout=HANG_GUARD)
    assert on_new_thread(torch.get_num_threads) == 1  # the default a helper left


def test_the_step_thread_is_parallel_and_the_load_threads_serial(bytebpe):
    on_new_thread(cpu_threads.serial)  # the process-wide default is now 1
    engine = make_engine(tiny_llama(vocab_size=300), bytebpe, materialize_threads=1)
    engine.store.register("n", random_nola(engine.store.spec, seed=1, rank=4,
                                           num_basis=16).to_bytes())
    aengine = AsyncEngine(engine)
    try:
        assert aengine._submit(torch.get_num_threads).result(HANG_GUARD) == \
            cpu_threads.PARALLEL_THREADS
        assert engine.admission._worker.submit(torch.get_num_threads).result() == 1
        assert engine.store._regen.submit(torch.get_num_threads).result() == 1
    finally:
        aengine.stop()


def test_the_server_builds_on_a_thread_that_ends_and_its_executor_is_serial(
        bytebpe, monkeypatch):
    built_on = []

    def build(config):
        built_on.append(threading.current_thread())
        return make_engine(tiny_llama(vocab_size=300), bytebpe)

    monkeypatch.setattr(app, "build_engine", build)

    async def main():
        engine = await app._build_on_own_thread(Config())
        built_on[0].join(timeout=HANG_GUARD)
        async with serving(engine):
            return await asyncio.to_thread(torch.get_num_threads)

    assert asyncio.run(main()) == 1
    assert built_on[0] is not threading.main_thread() and not built_on[0].is_alive()
