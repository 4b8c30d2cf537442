"""What the Triton launchers need to know about the device: read once, not per launch."""

from __future__ import annotations

import functools
import os

import torch

# Under Triton's CPU interpreter (the tests) grids are shaped as on an H100 (132 SMs).
INTERPRETER_SM_COUNT = 132


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (CUDA), cached per device;
    ``INTERPRETER_SM_COUNT`` for CPU tensors under the interpreter."""
    if device.type != "cuda":
        return INTERPRETER_SM_COUNT
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_sm_count(index)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def triton_interpreted() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``), which Triton itself
    reads when it is imported; read here once, on the first launch."""
    return os.environ.get("TRITON_INTERPRET") == "1"
