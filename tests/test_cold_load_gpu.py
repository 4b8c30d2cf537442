"""Cold loads off the step path on CUDA (issue #28 item 4): a NOLA regeneration in flight on
the slot pool's side stream never delays a step on the compute stream. No timing: the step
finishes (its stream synchronized) while the load is still running on the GPU."""

from __future__ import annotations

import threading

import pytest
import torch

from nolaserve.adapters.ops import add_lora_rows, slot_runs
from nolaserve.adapters.slots import SlotPool
from nolaserve.adapters.spec import AdapterFactors, BaseModelSpec, DirectFactors, ModuleFactors

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
SPEC = BaseModelSpec(num_layers=1, module_shapes={"q": (64, 64)}, max_rank=8)
SLOW_CYCLES = 4_000_000_000  # about 2 s of GPU sleep queued by the "regeneration"


def test_a_step_is_not_delayed_by_a_slow_regeneration_in_flight():
    queued, loaded = threading.Event(), threading.Event()

    def slow_write(views):
        torch.cuda._sleep(SLOW_CYCLES)  # on the current stream: the pool's side stream
        for a, b in views.values():
            a.fill_(0.5), b.fill_(0.5)
        queued.set()

    hot = AdapterFactors({(0, "q"): ModuleFactors(A=torch.ones(8, 64), B=torch.ones(64, 8),
                                                   scale=1.0)})
    pool = SlotPool(SPEC, 2, lambda i: hot, "cuda", torch.float16,
                    direct=lambda i: DirectFactors({(0, "q"): 8}, 1.0, slow_write)
                    if i == "cold" else None)
    slot = pool.acquire("hot")
    A, B, scale = pool.buffers(0, "q")
    token_slot = torch.tensor([slot, -1, slot], device="cuda")
    y = torch.zeros(3, 64, device="cuda", dtype=torch.float16)
    # compile and load every kernel of the step first: Triton's first launch (JIT, launcher
    # build) and CUDA lazy module loading (which may synchronize the context, i.e. wait for
    # the side stream's sleep) must not fall inside the 2 s window
    add_lora_rows(y.clone(), torch.ones_like(y), A, B, scale, token_slot, slot_runs(token_slot))
    torch.cuda.synchronize()
    load = threading.Thread(target=lambda: (pool.acquire("cold"), loaded.set()))
    load.start()
    assert queued.wait(60)
    # one decode step's LoRA on the compute stream, for the hot adapter's rows
    assert pool.try_acquire("hot") == slot and pool.try_acquire("cold") is None
    add_lora_rows(y, torch.ones_like(y), A, B, scale, token_slot, slot_runs(token_slot))
    torch.cuda.current_stream().synchronize()
    assert not loaded.is_set()  # the step is done, the regeneration still in flight
    assert y[0].eq(512).all() and not y[1].any()
    load.join(60)
    assert loaded.is_set() and pool.try_acquire("cold") is not None
